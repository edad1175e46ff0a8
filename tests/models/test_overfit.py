"""A tiny model must fit a handful of generated images: the training loss falls by a large factor."""
import torch

from detr_cuda.models import build_model
from tests.support.configs import tiny_model_config
from tests.support.models import rectangle_images, total_loss


def test_tiny_model_overfits_generated_rectangles(one_thread):
    torch.manual_seed(0)
    cfg = tiny_model_config("model.hidden_dim=32", "model.nheads=2", "model.num_queries=10")
    model, criterion, _ = build_model(cfg, 2)
    images, mask, targets = rectangle_images(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                                  weight_decay=1e-4)
    losses = []
    for _ in range(70):
        loss = total_loss(criterion, criterion(model(images, mask), targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
