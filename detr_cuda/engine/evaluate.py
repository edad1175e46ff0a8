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
import time

import torch

from ..data.coco_eval import CocoEvaluator, format_metrics
from ..util.device import autocast_context, move_to_device
from .logger import format_seconds


@torch.no_grad()
def evaluate(model, postprocessor, loader, dataset, device, cfg, output_dir, log=print, categories=None):
    """COCO bbox metrics of ``model`` on ``loader`` (every rank calls it; every rank gets the result).

    categories: the model's CategoryMap (what its class rows mean; default: the dataset's).

    Returns the evaluator's result: "metrics" {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...},
    "coco_stats" (the 12 stats in pycocotools' order), "per_class" (list of {category_id, name, num_gt,
    AP, AP50}), "num_images", "num_detections", "summary". Rank 0 writes eval.json and
    detections.json into ``output_dir``.
    """
    started = time.time()
    model.eval()
    categories = categories or dataset.categories
    evaluator = CocoEvaluator(dataset.load_coco_gt(), categories.label_to_category_id,
                              score_threshold=cfg.eval.score_threshold)
    num_batches = len(loader)
    report_every = max(1, num_batches // 10)  # about ten progress lines per evaluation
    for index, (images, masks, targets) in enumerate(loader, start=1):
        images, masks, targets = move_to_device(images, masks, targets, device)
        with autocast_context(device, cfg.train.amp):
            outputs = model(images, masks)
        original_sizes = torch.stack([t["orig_size"] for t in targets])
        evaluator.update([t["image_id"] for t in targets], postprocessor(outputs, original_sizes))
        if index % report_every == 0 and index < num_batches:
            elapsed = time.time() - started
            log(f"evaluation [{index}/{num_batches}] {format_seconds(elapsed)} elapsed, "
                f"eta {format_seconds(elapsed / index * (num_batches - index))}")
    result = evaluator.evaluate(output_dir=output_dir)
    log(format_metrics(result))
    log(f"evaluated {result['num_images']} images in {time.time() - started:.1f}s "
        f"(top-{cfg.eval.num_select} detections per image, score >= {cfg.eval.score_threshold})")
    return result


SCALAR_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def scalar_metrics(result):
    """The headline numbers of an evaluation result, for log lines and TensorBoard."""
    return {name: result["metrics"][name] for name in SCALAR_METRICS if name in result["metrics"]}
