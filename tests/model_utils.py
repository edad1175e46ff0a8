"""Shared helpers for the model tests: tiny configs and padded batches."""
import torch

from detr_cuda.config import load_config

TINY = ["model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=12", "model.dropout=0.0",
        "model.enc_n_points=2", "model.dec_n_points=2"]

VARIANTS = {
    "single_scale": ["model.num_feature_levels=1"],
    "multi_scale": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
}


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def padded_batch(sizes, seed=0):
    """Images of different (h, w) zero-padded to the largest: (images, padding_mask, sizes)."""
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        mask[i, :h, :w] = False
    return images, mask


def random_targets(counts, num_classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator),
                        "boxes": torch.cat([centres, sizes], 1)})
    return targets


def total_loss(criterion, losses):
    return sum(losses[k] * criterion.weight_dict[k] for k in criterion.weight_dict if k in losses)
