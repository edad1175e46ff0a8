"""Evaluation: model + postprocessor over a loader, scored by the data package's COCO evaluator.

The evaluator keys detections by image id, so the duplicates that the
distributed sampler adds to even out shards count once.

A batch pads its images to the largest one (with a mask). As in DETR and
Deformable DETR, the padded zeros still reach the backbone's convolutions
near an image's right and bottom edges, so scores shift slightly with an
image's batch neighbours (configs/demo.yaml: AP 0.528 at eval.batch_size=1,
0.530 at 16). With eval.batch_size=1 the result depends neither on batching
nor on the number of processes.
"""
import os
import time

import torch

from ..data.coco_eval import CocoEvaluator, combine_results, format_metrics, write_combined_eval
from ..data.concat import category_ids_for
from ..util.device import autocast_context, move_to_device
from .logger import format_seconds


def part_evaluators(parts, categories, score_threshold, log):
    """One CocoEvaluator per data set, scoring the model's labels (``categories``) in that data set's
    own category ids, matched by name; logs what the model and a data set do not share."""
    evaluators = []
    for index, part in enumerate(parts):
        category_ids = category_ids_for(part.categories, categories)
        where = f"validation set {index} ({part.annotation_file})" if len(parts) > 1 else "the validation set"
        missing = sorted(set(c for c in part.label_to_category_id) - set(category_ids))
        if missing:
            log(f"{where}: {len(missing)} categor{'y' if len(missing) == 1 else 'ies'} the model was not trained on "
                f"(scored as misses): {part.categories.describe([part.label_to_category_id.index(c) for c in missing])}")
        evaluators.append(CocoEvaluator(part.load_coco_gt(), category_ids, score_threshold=score_threshold))
    return evaluators


@torch.no_grad()
def evaluate(model, postprocessor, loader, dataset, device, cfg, output_dir, log=print, categories=None):
    """COCO bbox metrics of ``model`` on ``loader`` (every rank calls it; every rank gets the result).

    dataset: a CocoDetection, or a ConcatDetection whose parts are each scored against their own
    ground truth and category ids. categories: the model's CategoryMap (what its class rows mean;
    default: the dataset's); labels are matched to each data set's categories by name.

    Returns the evaluator's result: "metrics" {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...},
    "coco_stats" (the 12 stats in pycocotools' order), "per_class" (list of {category_id, name, num_gt,
    AP, AP50}), "num_images", "num_detections", "summary". Rank 0 writes eval.json and
    detections.json into ``output_dir``. Several data sets: each one's result (and files, in
    ``output_dir/val<k>/``) under "datasets", and "metrics" / "coco_stats" their means
    (:func:`detr_cuda.data.coco_eval.combine_results`).
    """
    started = time.time()
    model.eval()
    parts = getattr(dataset, "parts", [dataset])
    evaluators = part_evaluators(parts, categories or dataset.categories, cfg.eval.score_threshold, log)
    num_batches = len(loader)
    report_every = max(1, num_batches // 10)  # about ten progress lines per evaluation
    for index, (images, masks, targets) in enumerate(loader, start=1):
        images, masks, targets = move_to_device(images, masks, targets, device)
        with autocast_context(device, cfg.train.amp):
            outputs = model(images, masks)
        original_sizes = torch.stack([t["orig_size"] for t in targets])
        for target, detection in zip(targets, postprocessor(outputs, original_sizes)):
            evaluators[target.get("dataset_index", 0)].update([target["image_id"]], [detection])
        if index % report_every == 0 and index < num_batches:
            elapsed = time.time() - started
            log(f"evaluation [{index}/{num_batches}] {format_seconds(elapsed)} elapsed, "
                f"eta {format_seconds(elapsed / index * (num_batches - index))}")
    if len(parts) == 1:
        result = evaluators[0].evaluate(output_dir=output_dir)
        log(format_metrics(result))
    else:
        result = evaluate_parts(evaluators, parts, output_dir, log)
    log(f"evaluated {result['num_images']} images in {time.time() - started:.1f}s "
        f"(top-{cfg.eval.num_select} detections per image, score >= {cfg.eval.score_threshold})")
    return result


def evaluate_parts(evaluators, parts, output_dir, log):
    """Each data set's result (files in ``output_dir/val<k>/``), then their means in eval.json."""
    results = []
    for index, (evaluator, part) in enumerate(zip(evaluators, parts)):
        folder = None if output_dir is None else os.path.join(output_dir, f"val{index}")
        result = evaluator.evaluate(output_dir=folder)
        log(f"validation set {index}: {part.image_dir}, {part.annotation_file}\n{format_metrics(result)}")
        results.append(dict(result, images=part.image_dir, annotations=part.annotation_file))
    combined = combine_results(results)
    log(f"mean over {len(parts)} validation sets: " + " ".join(
        f"{name} {combined['metrics'][name]:.3f}" for name in ("AP", "AP50", "AP75")))
    if output_dir is not None:
        write_combined_eval(output_dir, combined)
    return combined


SCALAR_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def scalar_metrics(result):
    """The headline numbers of an evaluation result, for log lines and TensorBoard; with several data
    sets also each one's AP and AP50 (``val<k>_AP``, ``val<k>_AP50``)."""
    scalars = {name: result["metrics"][name] for name in SCALAR_METRICS if name in result["metrics"]}
    for index, part in enumerate(result.get("datasets", [])):
        scalars.update({f"val{index}_{name}": part["metrics"][name] for name in ("AP", "AP50")})
    return scalars
