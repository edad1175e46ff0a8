"""A stand-alone evaluation job (``tools/eval.py``): data, model, weights that must fit, COCO metrics."""
import os

from .. import checkpoint as ckpt_io
from ..categories import OFFICIAL_COCO_NUM_CLASSES, CategoryMap
from ..util import dist
from ..util.device import select_device
from .evaluate import evaluate


def model_categories(cfg, dataset):
    """What the evaluated model's class rows mean: the dataset's categories, or, when the config fixes
    model.num_classes=91 (the official COCO heads kept whole), the COCO id table."""
    wanted = cfg.model.num_classes
    if wanted is None or wanted == dataset.categories.num_labels:
        return dataset.categories
    if wanted == OFFICIAL_COCO_NUM_CLASSES:
        return CategoryMap.official_coco()
    raise ckpt_io.WeightsMismatch(f"model.num_classes={wanted} but the validation set has "
                                  f"{dataset.categories.num_labels} categories; leave model.num_classes unset to "
                                  "evaluate on this dataset's categories")


def run_evaluation(cfg, weights, output_dir, prefer_ema=True):
    """Evaluates ``weights`` on the config's validation set; returns the result dict."""
    _, _, local_rank = dist.env_world()
    device = select_device(cfg.train.device, local_rank)
    dist.init_distributed(device, cfg.train.dist_timeout_s)
    log = print if dist.is_main_process() else (lambda message: None)
    try:
        from ..data import build_dataloader, build_dataset
        from ..models import build_model
        dataset = build_dataset(cfg, "val")
        log(dataset.summary())
        categories = model_categories(cfg, dataset)
        model, _, postprocessor = build_model(cfg, categories.num_labels)
        ckpt_io.load_for_inference(model, weights, categories, prefer_ema, log)
        model.to(device)
        loader = build_dataloader(dataset, cfg.eval.batch_size, train=False, distributed=dist.get_world_size() > 1,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        if dist.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
        return evaluate(model, postprocessor, loader, dataset, device, cfg, output_dir, log=log, categories=categories)
    finally:
        dist.cleanup()
