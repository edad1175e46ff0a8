"""Shared pieces of the inference / export tests: a tiny detector trained for a few steps on the
generated shapes set and saved as one of our checkpoints (model, config, category map)."""
import os

import pytest
import torch

from detr_cuda.config import config_to_dict, load_config
from detr_cuda.data.coco import CocoDetection
from detr_cuda.data.loader import collate_fn
from detr_cuda.data.synthetic import generate_synthetic_coco
from detr_cuda.data.transforms import build_transforms
from detr_cuda.engine.checkpoint import FORMAT, save_atomic
from detr_cuda.models import build_model

# Small enough to train a few dozen steps on a CPU in seconds; four levels, 96-px images.
TINY_INFER = ["model.backbone=resnet18", "model.backbone_width=16", "model.hidden_dim=32", "model.nheads=4",
              "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=10",
              "model.dropout=0.0", "model.enc_n_points=2", "model.dec_n_points=2", "model.num_feature_levels=4",
              "data.val_short_side=96", "data.val_max_size=128", "eval.num_select=20",
              "model.msda_backend=reference"]
TRAIN_STEPS = 20


def tiny_infer_config(*overrides):
    return load_config(None, TINY_INFER + list(overrides))


def train_tiny_detector(out_dir, steps=TRAIN_STEPS, seed=0):
    """Trains the tiny detector on 8 generated images; returns (checkpoint path, dataset paths dict)."""
    torch.manual_seed(seed)
    paths = generate_synthetic_coco(os.path.join(out_dir, "shapes"), num_images=8, image_size=96, seed=seed)
    cfg = tiny_infer_config()
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
                  "category_map": dataset.category_map(), "ema": None}
    path = os.path.join(out_dir, "tiny_checkpoint.pth")
    save_atomic(checkpoint, path)
    return path, paths


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(checkpoint path, {"images": folder, "annotations": json}) of the briefly trained tiny detector."""
    return train_tiny_detector(str(tmp_path_factory.mktemp("tiny_detector")))
