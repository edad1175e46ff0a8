"""COCO bbox evaluation through pycocotools, independent of the number of processes and the batch size.

Usage (every rank)::

    evaluator = CocoEvaluator(dataset.load_coco_gt(), dataset.label_to_category_id)
    for images, padding_mask, targets in loader:
        results = postprocessor(model(images, padding_mask), orig_sizes)   # per image: scores, labels, boxes
        evaluator.update([t["image_id"] for t in targets], results)
    result = evaluator.evaluate(output_dir=output_dir)  # same dict on every rank; rank 0 writes files
    result["metrics"]["AP"], result["per_class"], format_metrics(result)

Detections are stored per image id, so images repeated by the distributed
sampler's padding count once, and the evaluated image set is exactly the set
of images seen (other ground-truth images are not counted as misses).
"""
import contextlib
import copy
import io
import json
import os

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..util import dist

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _to_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def detection_to_array(image_id, detection, label_to_category_id, score_threshold=0.0):
    """One image's detection dict -> (K, 6) float64 rows [x, y, w, h, score, dataset category id].

    detection: ``scores`` (K,), ``labels`` (K,) int contiguous model labels,
    ``boxes`` (K, 4) absolute xyxy in the original image size.
    """
    scores = _to_numpy(detection["scores"]).astype(np.float64).reshape(-1)
    labels = _to_numpy(detection["labels"]).astype(np.int64).reshape(-1)
    boxes = _to_numpy(detection["boxes"]).astype(np.float64).reshape(-1, 4)
    if not len(scores) == len(labels) == len(boxes):
        raise ValueError(f"image {image_id}: scores {len(scores)}, labels {len(labels)} and boxes {len(boxes)} "
                         "must have the same length")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_to_category_id)):
        raise ValueError(f"image {image_id}: predicted label {int(labels.max())} outside the category map of "
                         f"{len(label_to_category_id)} labels (model/dataset class count mismatch?)")
    category_ids = np.asarray([np.nan if c is None else c for c in label_to_category_id], dtype=np.float64)[labels]
    keep = (scores >= score_threshold) & ~np.isnan(category_ids)  # rows that name no category are dropped
    boxes, scores, category_ids = boxes[keep], scores[keep], category_ids[keep]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return np.concatenate([xywh, scores[:, None], category_ids[:, None]], axis=1)


def arrays_to_coco_results(arrays_by_image):
    """{image id: (K, 6) array} -> COCO results list (image_id, category_id, bbox xywh, score)."""
    return [{"image_id": int(image_id), "category_id": int(row[5]), "bbox": [float(v) for v in row[:4]],
             "score": float(row[4])}
            for image_id in sorted(arrays_by_image) for row in arrays_by_image[image_id]]


def _empty_results(coco_gt):
    coco_dt = COCO()
    coco_dt.dataset = {"images": copy.copy(coco_gt.dataset["images"]), "categories": copy.deepcopy(
        coco_gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def evaluate_coco(coco_gt, coco_results, image_ids, class_names=None):
    """COCO bbox metrics of ``coco_results`` (COCO results list) on ``image_ids``.

    Returns {"metrics": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1",
    "AR10", "AR100", "ARs", "ARm", "ARl"} (floats; -1 where the subset has no
    ground truth, as pycocotools), "coco_stats": the same 12 numbers in
    pycocotools' order (DETR's ``test_coco_eval_bbox``), "per_class": [{
    "category_id", "name", "num_gt", "AP", "AP50"} (AP None without ground
    truth)], "num_images", "num_detections", "summary": pycocotools' table}.
    ``class_names``: {category id: name} overriding the ground-truth names.
    """
    image_ids = sorted({int(i) for i in image_ids})
    if not image_ids:
        raise ValueError("no images were evaluated (empty evaluation set?)")
    unknown = [i for i in image_ids if i not in coco_gt.imgs]
    if unknown:
        raise ValueError(f"image ids {unknown[:10]} are not in the ground truth")
    silent = io.StringIO()
    with contextlib.redirect_stdout(silent):
        # loadRes adds segmentation/area/id/iscrowd to each dict it is given: hand it copies so that
        # the caller's list (written to detections.json) stays in the COCO results format.
        coco_dt = coco_gt.loadRes([dict(r) for r in coco_results]) if coco_results else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    stats = [float(s) for s in coco_eval.stats]

    # precision: (iou thresholds, recall points, categories, area ranges, max dets); area "all", 100 dets.
    precision = coco_eval.eval["precision"]
    category_ids = coco_eval.params.catIds
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt.dataset["categories"]}
    names.update(class_names or {})
    image_set = set(image_ids)
    per_class = []
    for k, category_id in enumerate(category_ids):
        num_gt = sum(1 for a in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[category_id]))
                     if a["image_id"] in image_set and not a.get("iscrowd", 0))
        all_iou = precision[:, :, k, 0, -1]
        at_50 = precision[0, :, k, 0, -1]
        per_class.append({
            "category_id": int(category_id), "name": names[category_id], "num_gt": num_gt,
            "AP": float(all_iou[all_iou > -1].mean()) if (all_iou > -1).any() else None,
            "AP50": float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else None,
        })
    return {"metrics": dict(zip(STAT_NAMES, stats)), "coco_stats": stats, "per_class": per_class,
            "num_images": len(image_ids), "num_detections": len(coco_results), "summary": summary.getvalue()}


def format_metrics(result):
    """pycocotools' 12-line table followed by a per-class AP table (classes without ground truth: '-')."""
    lines = [result["summary"].rstrip(), f"{'category':<24}{'id':>6}{'gt':>7}{'AP':>8}{'AP50':>8}"]
    for row in result["per_class"]:
        ap = "-" if row["AP"] is None else f"{row['AP']:.3f}"
        ap50 = "-" if row["AP50"] is None else f"{row['AP50']:.3f}"
        lines.append(f"{row['name'][:23]:<24}{row['category_id']:>6}{row['num_gt']:>7}{ap:>8}{ap50:>8}")
    return "\n".join(lines)


class CocoEvaluator:
    """Collects per-image detections (see module docstring) and evaluates them once, on rank 0.

    class_names: optional names in label order (default: the ground truth's).
    """

    def __init__(self, coco_gt, label_to_category_id, class_names=None, score_threshold=0.0):
        self.coco_gt = coco_gt
        self.label_to_category_id = [None if c is None else int(c) for c in label_to_category_id]
        self.class_names = None if class_names is None else {
            c: name for c, name in zip(self.label_to_category_id, class_names) if c is not None}
        self.score_threshold = score_threshold
        self.results = {}  # image id -> (K, 6) array [x, y, w, h, score, category id]

    def update(self, image_ids, detections):
        """image_ids: B ints or scalar tensors; detections: B dicts (scores, labels, boxes abs xyxy)."""
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, detection in zip(image_ids, detections):
            if image_id in self.results:  # repeated by the distributed sampler's padding
                continue
            self.results[image_id] = detection_to_array(image_id, detection, self.label_to_category_id,
                                                        self.score_threshold)

    def gather(self):
        """{image id: (K, 6) array} merged over all ranks (first occurrence of an image id kept)."""
        merged = {}
        for part in dist.all_gather_object(self.results):
            for image_id, results in part.items():
                merged.setdefault(image_id, results)
        return merged

    def evaluate(self, output_dir=None):
        """Result dict of :func:`evaluate_coco` on what :meth:`update` collected; writes ``eval.json``
        and ``detections.json`` (COCO results format) into ``output_dir`` when given. A collective
        under torch.distributed: every rank calls it, rank 0 computes, every rank gets the result.
        """
        merged = self.gather()
        result = None
        if dist.is_main_process():
            coco_results = arrays_to_coco_results(merged)
            result = evaluate_coco(self.coco_gt, coco_results, merged.keys(), self.class_names)
            if output_dir is not None:
                write_eval_files(output_dir, result, coco_results)
        return dist.broadcast_object(result)


def combine_results(results):
    """One result over several data sets' :func:`evaluate_coco` results: "metrics" and "coco_stats"
    are the means over the data sets (each weighs the same; a stat a data set has no ground truth for,
    -1, is left out of its mean, and stays -1 when no data set has it), "num_images" and
    "num_detections" the sums, "datasets" the results themselves (without their pycocotools table)."""
    stats = []
    for column in zip(*(result["coco_stats"] for result in results)):
        known = [value for value in column if value > -1]
        stats.append(float(np.mean(known)) if known else -1.0)
    return {"metrics": dict(zip(STAT_NAMES, stats)), "coco_stats": stats,
            "num_images": sum(r["num_images"] for r in results),
            "num_detections": sum(r["num_detections"] for r in results),
            "datasets": [{k: v for k, v in r.items() if k != "summary"} for r in results]}


def write_combined_eval(output_dir, combined):
    """eval.json of several data sets (:func:`combine_results`); their own files are in val<k>/."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval.json"), "w") as handle:
        json.dump(combined, handle, indent=1)


def write_eval_files(output_dir, result, coco_results):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval.json"), "w") as handle:
        json.dump({k: v for k, v in result.items() if k != "summary"}, handle, indent=1)
    with open(os.path.join(output_dir, "detections.json"), "w") as handle:
        json.dump(coco_results, handle)
