"""Evaluation: model + postprocessor over a loader, gathered over ranks, scored by the COCO evaluator.

Predictions are keyed by image id, so the duplicates that the distributed
sampler adds to even out shards collapse, and the result does not depend on
the number of processes or the batch size (images are padded with a mask).
"""
import time

import torch

from . import distributed
from .train_loop import autocast_context, move_to_device


@torch.no_grad()
def predict(model, postprocessor, loader, device, amp="none", score_threshold=0.0):
    """{image_id: {scores (k,), labels (k,) int64, boxes (k, 4) xyxy in original-image pixels}} on CPU."""
    model.eval()
    predictions = {}
    for images, masks, targets in loader:
        images, masks, targets = move_to_device(images, masks, targets, device)
        with autocast_context(device, amp):
            outputs = model(images, masks)
        original_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessor(outputs, original_sizes)
        for target, result in zip(targets, results):
            keep = result["scores"] >= score_threshold
            predictions[int(target["image_id"])] = {k: v[keep].float().cpu() if k != "labels" else v[keep].cpu()
                                                    for k, v in result.items()}
    return predictions


def gather_predictions(predictions):
    """Every rank's predictions merged on rank 0 (None elsewhere); duplicates collapse by image id."""
    gathered = distributed.all_gather_object(predictions)
    if not distributed.is_main_process():
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def evaluate(model, postprocessor, loader, dataset, device, cfg, output_dir, log=print):
    """Runs COCO evaluation; on rank 0 returns {"metrics": {AP, AP50, ...}, "coco_stats": [12 floats],
    "per_class": [...]}, elsewhere None. Writes eval.json and detections into ``output_dir`` (rank 0)."""
    from ..data import CocoEvaluator
    started = time.time()
    local = predict(model, postprocessor, loader, device, cfg.train.amp, cfg.eval.score_threshold)
    predictions = gather_predictions(local)
    if predictions is None:
        return None
    evaluator = CocoEvaluator(dataset.load_coco_gt(), dataset.label_to_category_id, dataset.class_names)
    result = evaluator.evaluate(predictions, output_dir=output_dir)
    log(evaluator.format_table(result))
    log(f"evaluated {len(predictions)} images in {time.time() - started:.1f}s "
        f"(top-{cfg.eval.num_select} detections per image)")
    return result
