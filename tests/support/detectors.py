"""The inference and export tests' detector: DETECTOR_TINY trained for a few steps on the generated
shapes set and saved as one of our checkpoints (model, config, category map)."""
import os

import torch

from detr_cuda.config import config_to_dict
from detr_cuda.data.coco import CocoDetection
from detr_cuda.data.loader import collate_fn
from detr_cuda.data.synthetic import generate_synthetic_coco
from detr_cuda.data.transforms import build_transforms
from detr_cuda.checkpoint import FORMAT, save_atomic
from detr_cuda.models import build_model

from .configs import tiny_detector_config

TRAIN_STEPS = 20


def train_tiny_detector(out_dir, steps=TRAIN_STEPS, seed=0):
    """Trains the tiny detector on 8 generated images; returns (checkpoint path, dataset paths dict)."""
    torch.manual_seed(seed)
    paths = generate_synthetic_coco(os.path.join(out_dir, "shapes"), num_images=8, image_size=96, seed=seed)
    cfg = tiny_detector_config()
    dataset = CocoDetection(paths["images"], paths["annotations"], build_transforms(cfg.data, train=False))
    model, criterion, _ = build_model(cfg, dataset.num_classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    model.train()
    batch_size = 2
    for step in range(steps):
        start = (step * batch_size) % len(dataset)
        images, masks, targets = collate_fn([dataset[(start + i) % len(dataset)] for i in range(batch_size)])
        losses = criterion(model(images, masks), targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in criterion.weight_dict if k in losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    checkpoint = {"format": FORMAT, "model": model.state_dict(), "config": config_to_dict(cfg),
                  "category_map": dataset.categories.to_dict(), "ema": None}
    path = os.path.join(out_dir, "tiny_checkpoint.pth")
    save_atomic(checkpoint, path)
    return path, paths
