"""Pictures for people: ground truth beside predictions, and where one decoder query samples."""
import os

import torch

from ..data.coco import CocoDetection
from ..data.loader import collate_fn
from ..util.box_ops import box_cxcywh_to_xyxy
from .attention import capture_decoder_sampling, query_points_in_image
from .drawing import draw_detections, draw_sampling_points, shared_colour_indices, side_by_side


def render_ground_truth_vs_predictions(detector, dataset, index, score_threshold=0.3):
    """Side-by-side picture of dataset entry ``index``: its ground truth (left) and the detector's
    boxes scoring >= ``score_threshold`` (right), both named by the dataset's categories.

    dataset: a :class:`CocoDetection` built without transforms (PIL image, absolute xyxy boxes).
    """
    image, target = dataset[index]
    gt_names = [dataset.class_names[label] for label in target["labels"].tolist()]
    colours = shared_colour_indices(detector.category_map.class_names, dataset.class_names)
    left = draw_detections(image, target["boxes"], gt_names, colour_keys=[colours[n] for n in gt_names])
    named = detector.named(detector.detect([image])[0], score_threshold)
    right = draw_detections(image, named["boxes"], named["names"], named["scores"],
                            colour_keys=[colours[n] for n in named["names"]])
    return side_by_side(left, right, f"ground truth ({len(gt_names)})",
                        f"predictions >= {score_threshold:g} ({len(named['names'])})")


def write_ground_truth_vs_predictions(detector, image_dir, annotation_file, out_dir, num_images=8,
                                      image_ids=None, score_threshold=0.3, image_format="jpg"):
    """Writes ``out_dir/compare_<image id>.<image_format>`` ("jpg" or "png") for the first
    ``num_images`` images of a COCO-format dataset (or the given ``image_ids``). Returns the written
    paths."""
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    dataset = CocoDetection(image_dir, annotation_file, transforms=None, invalid_annotations="skip",
                            check_images="none")
    if image_ids:
        positions = {int(i): n for n, i in enumerate(dataset.image_ids.tolist())}
        missing = [i for i in image_ids if int(i) not in positions]
        if missing:
            raise ValueError(f"image ids {missing} are not in {annotation_file}")
        indices = [positions[int(i)] for i in image_ids]
    else:
        indices = list(range(min(num_images, len(dataset))))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for index in indices:
        picture = render_ground_truth_vs_predictions(detector, dataset, index, score_threshold)
        path = os.path.join(out_dir, f"compare_{int(dataset.image_ids[index])}.{image_format}")
        picture.save(path, **({"quality": 92} if image_format == "jpg" else {}))
        written.append(path)
    return written


@torch.no_grad()
def attention_points(detector, image, query=None):
    """Sampling points of one query in the last decoder layer's cross-attention, for a PIL image.

    query: a query index, or None for the query holding the best-scoring detection.
    Returns {"query", "score", "label", "box" (xyxy pixels), "points" (per level (H*P, 2) pixels
    of ``image``), "weights" (per level (H*P,)), "reference_point" (x, y)}.
    """
    pixels, padding_mask, _ = collate_fn([(detector.preprocess(image), {})])
    outputs, record = capture_decoder_sampling(detector.model, pixels.to(detector.device),
                                               padding_mask.to(detector.device))
    probabilities = outputs["pred_logits"][0].float().sigmoid().cpu()   # (Q, K)
    if query is None:
        query = int(probabilities.max(-1).values.argmax())
    num_queries = probabilities.shape[0]
    if not 0 <= query < num_queries:
        raise ValueError(f"query {query} out of range: the model has {num_queries} queries")
    score, label = probabilities[query].max(-1)
    width, height = image.size
    box = box_cxcywh_to_xyxy(outputs["pred_boxes"][0, query].float().cpu()) * torch.tensor(
        [width, height, width, height], dtype=torch.float32)
    found = query_points_in_image(record, 0, query, (height, width))
    found.update(query=query, score=float(score), label=int(label), box=box.tolist())
    return found


def render_attention(detector, image, query=None):
    """(picture, info): ``image`` with the chosen query's box, reference point and sampling points
    (one colour per level, radius by attention weight); info as :func:`attention_points`."""
    info = attention_points(detector, image, query)
    name = detector.category_map.class_names[info["label"]]
    picture = draw_sampling_points(image, info["points"], info["weights"], info["reference_point"], info["box"],
                                   title=f"query {info['query']}: {name} {info['score']:.2f}")
    return picture, info
