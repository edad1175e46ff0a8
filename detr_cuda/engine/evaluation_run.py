"""A stand-alone evaluation job (``tools/eval.py``): data, model, weights, COCO metrics."""
import os

import torch

from . import checkpoint as ckpt_io
from . import distributed
from .evaluate import evaluate
from .weights import load_weights


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
        checkpoint = ckpt_io.load_file(weights)
        saved_map = checkpoint.get("category_map") if isinstance(checkpoint, dict) else None
        if saved_map is not None and saved_map.get("label_to_category_id") != dataset.label_to_category_id:
            log(f"WARNING: {weights} was trained with category ids {saved_map.get('label_to_category_id')}, "
                f"this dataset has {dataset.label_to_category_id}; labels are mapped by position")
        load_weights(model, weights, category_ids=dataset.label_to_category_id, prefer_ema=prefer_ema, log=log)
        model.to(device)
        loader = build_dataloader(dataset, cfg.eval.batch_size, train=False,
                                  distributed=distributed.get_world_size() > 1,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        if is_main:
            os.makedirs(output_dir, exist_ok=True)
        return evaluate(model, postprocessor, loader, dataset, device, cfg, output_dir, log=log)
    finally:
        distributed.cleanup()
