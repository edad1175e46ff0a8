"""The optimizer's three parameter groups, the step LR schedule, and new learning rates after a resume."""
import pytest
from torch import nn

from detr_cuda.config import load_config
from detr_cuda.engine.optim import build_lr_scheduler, build_optimizer
from detr_cuda.engine.resume import apply_learning_rates


class Named(nn.Module):
    """Parameter names shaped like the detector's."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleList([nn.Linear(2, 2)])  # backbone.0.*
        self.sampling_offsets = nn.Linear(2, 2)
        self.reference_points = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)


def test_three_param_groups_by_name_and_step_drop_with_warmup():
    cfg = load_config(None, ["train.lr=1e-3", "train.lr_backbone=1e-4", "train.lr_linear_proj_mult=0.1",
                             "train.lr_drop=2", "train.warmup_steps=4"])
    model = Named()
    optimizer = build_optimizer(model, cfg.train)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-4)
    assert groups["main"]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert len(groups["linear_proj"]["params"]) == 4 and all(g["weight_decay"] == 1e-4 for g in groups.values())
    scheduler = build_lr_scheduler(optimizer, cfg.train, steps_per_epoch=5)
    seen = []
    for _ in range(25):  # 5 epochs of 5 steps
        seen.append(groups["main"]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-3 / 4) and seen[3] == pytest.approx(1e-3)   # warm-up ramp
    assert seen[9] == pytest.approx(1e-3) and seen[10] == pytest.approx(1e-4)      # drop after epoch 2
    assert seen[20] == pytest.approx(1e-5)                                          # and after epoch 4


def test_a_resume_with_new_learning_rates_trains_with_them():
    old = load_config(None, ["train.lr=1e-3", "train.lr_backbone=1e-4", "train.lr_drop=2"])
    model = Named()
    optimizer = build_optimizer(model, old.train)
    scheduler = build_lr_scheduler(optimizer, old.train, steps_per_epoch=5)
    for _ in range(12):  # into the third epoch: one drop
        optimizer.step()
        scheduler.step()
    state = (optimizer.state_dict(), scheduler.state_dict())

    new = load_config(None, ["train.lr=1e-5", "train.lr_backbone=1e-6", "train.lr_drop=4", "train.weight_decay=0.05"])
    restored = build_optimizer(model, new.train)
    restored_scheduler = build_lr_scheduler(restored, new.train, steps_per_epoch=5)
    restored.load_state_dict(state[0])
    restored_scheduler.load_state_dict(state[1])
    groups = {g["name"]: g for g in restored.param_groups}
    assert groups["main"]["lr"] == pytest.approx(1e-4)  # the stored run's lr, before the change is applied
    apply_learning_rates(restored, restored_scheduler, new.train)
    assert groups["main"]["lr"] == pytest.approx(1e-5)  # epoch 2 < lr_drop 4: no drop at the new rate
    assert groups["backbone"]["lr"] == pytest.approx(1e-6) and groups["linear_proj"]["lr"] == pytest.approx(1e-6)
    assert all(g["weight_decay"] == 0.05 for g in groups.values())
    seen = []
    for _ in range(10):
        restored.step()
        restored_scheduler.step()
        seen.append(groups["main"]["lr"])
    assert seen[6] == pytest.approx(1e-5) and seen[7] == pytest.approx(1e-6)  # the drop moves to step 20
