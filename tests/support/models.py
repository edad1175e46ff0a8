"""Inputs for the in-process model tests: padded image batches, targets, the weighted loss, seeded models."""
import torch

from detr_cuda.config import load_config
from detr_cuda.models import build_model


def seeded_model(overrides, num_classes, seed=0):
    """(cfg, model, criterion) of the config made of ``overrides``, built after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    cfg = load_config(None, list(overrides))
    model, criterion, _ = build_model(cfg, num_classes)
    return cfg, model, criterion

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


def fit(model, criterion, images, mask, targets, steps, lr=2e-3):
    """AdamW on one fixed batch (targets passed to the model: DN models build their DN queries) for
    ``steps`` steps; returns the weighted total loss (DN terms included) of every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        loss = total_loss(criterion, criterion(model(images, mask, targets), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def rectangle_images(count, size=64, seed=0):
    """Generated images with 1-2 filled rectangles of 2 colours (class = colour).

    Returns images (count, 3, size, size), padding_mask (all False), targets.
    """
    generator = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]])
    images = torch.zeros(count, 3, size, size)
    targets = []
    for i in range(count):
        labels, boxes = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
            w, h = torch.randint(12, 28, (2,), generator=generator).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=generator))
            y0 = int(torch.randint(0, size - h, (1,), generator=generator))
            label = int(torch.randint(0, 2, (1,), generator=generator))
            images[i, :, y0:y0 + h, x0:x0 + w] = colours[label][:, None, None]
            labels.append(label)
            boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
        targets.append({"labels": torch.tensor(labels), "boxes": torch.tensor(boxes)})
    return images, torch.zeros(count, size, size, dtype=torch.bool), targets
