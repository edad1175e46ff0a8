"""A stand-alone evaluation job (``tools/eval.py``): data, model, weights, COCO metrics."""
import os

import torch

from . import distributed
from .evaluate import evaluate
from .weights import load_weights, short_list


def run_evaluation(cfg, weights, output_dir, prefer_ema=True):
    """Evaluates ``weights`` on the config's validation set; returns the result dict on rank 0."""
    _, _, local_rank = distributed.env_world()
    device = distributed.select_device(cfg.train.device, local_rank)
    distributed.init_distributed(device, cfg.train.dist_timeout_s)
    is_main = distributed.is_main_process()
    log = print if is_main else (lambda message: None)
    try:
        from ..data import build_dataloader, build_dataset
        from ..models import build_model
        dataset = build_dataset(cfg, "val")
        if dataset is None:
            raise ValueError("the config names no validation set (data.val_images / data.val_annotations)")
        log(dataset.summary())
        model, _, postprocessor = build_model(cfg, dataset.num_classes)
        report = load_weights(model, weights, category_ids=dataset.label_to_category_id, prefer_ema=prefer_ema,
                              log=log)
        check_class_heads(report, weights, dataset)
        model.to(device)
        loader = build_dataloader(dataset, cfg.eval.batch_size, train=False,
                                  distributed=distributed.get_world_size() > 1,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        if is_main:
            os.makedirs(output_dir, exist_ok=True)
        return evaluate(model, postprocessor, loader, dataset, device, cfg, output_dir, log=log)
    finally:
        distributed.cleanup()


def check_class_heads(report, weights, dataset):
    """Raises ValueError when some of the dataset's classes would be scored by untrained class rows.

    Evaluating is only meaningful when every category of the validation set
    has a trained row in the file: the same categories, a superset (rows are
    picked by category id) or the official 91-way head. A re-initialised head
    would print a plausible-looking but meaningless COCO table.
    """
    annotations = getattr(dataset, "annotation_file", "the validation set")
    if report["reinitialised"]:
        raise ValueError(
            f"class count mismatch: {weights} has a {report['file_num_classes']}-class head, the validation set "
            f"{annotations} has {dataset.num_classes} classes, and its rows cannot be matched by category id; "
            "evaluate on the dataset the checkpoint was trained on (or fine-tune it on this one with "
            "tools/train.py --weights)")
    absent = report["categories_not_in_file"]
    if absent:
        raise ValueError(
            f"class mismatch: {weights} has a {report['file_num_classes']}-class head (category ids "
            f"{short_list(report['file_category_ids'])}), the validation set {annotations} has "
            f"{dataset.num_classes} classes, {len(absent)} of them without a trained row (ids {short_list(absent)}); "
            "evaluate on the dataset the checkpoint was trained on (or fine-tune it on this one with "
            "tools/train.py --weights)")
