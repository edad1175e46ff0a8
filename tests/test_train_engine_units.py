"""In-process unit tests of the engine pieces: optimizer groups, LR schedule, checkpoints, RNG, weights."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from detr_cuda.config import load_config
from detr_cuda.engine import checkpoint as ckpt_io
from detr_cuda.engine.ema import ModelEMA
from detr_cuda.engine.optim import build_lr_scheduler, build_optimizer
from detr_cuda.engine.train_loop import TrainState, non_finite_outputs, weighted_total
from detr_cuda.engine.trainer import config_differences, world_size_change_message
from detr_cuda.engine.weights import load_weights


class Named(nn.Module):
    """Parameter names shaped like the detector's."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.backbone = nn.ModuleList([nn.Linear(2, 2)])  # backbone.0.*
        self.sampling_offsets = nn.Linear(2, 2)
        self.reference_points = nn.Linear(2, 2)
        self.class_embed = nn.ModuleList([nn.Linear(2, num_classes), nn.Linear(2, num_classes)])
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


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    ckpt_io.save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_io.save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]  # no temporary file left behind


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    ckpt_io.save_atomic({"rng": ckpt_io.capture_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt_io.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_weights_reinitialise_or_map_class_heads_and_report(tmp_path):
    source = Named(num_classes=91)
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}, "epoch": 49},
               tmp_path / "official_like.pth")
    lines = []
    target = Named(num_classes=3)
    fresh_head = target.class_embed[0].weight.detach().clone()
    report = load_weights(target, tmp_path / "official_like.pth", log=lines.append)
    assert torch.equal(target.head.weight, source.head.weight)               # 'module.' prefix stripped
    assert torch.equal(target.class_embed[0].weight, fresh_head)             # re-initialised, not loaded
    assert "class_embed.0.weight" in report["reinitialised"]
    assert any("RE-INITIALISED" in line and "91 vs 3" in line for line in lines)

    mapped = Named(num_classes=3)
    report = load_weights(mapped, tmp_path / "official_like.pth", category_ids=[1, 5, 90], log=lines.append)
    assert torch.equal(mapped.class_embed[1].weight, source.class_embed[1].weight[[1, 5, 90]])
    assert torch.equal(mapped.class_embed[1].bias, source.class_embed[1].bias[[1, 5, 90]])
    assert "class_embed.1.bias" in report["mapped"]


def _our_checkpoint(model, category_ids, path):
    torch.save({"format": ckpt_io.FORMAT, "model": model.state_dict(), "epoch": 0,
                "category_map": {"label_to_category_id": list(category_ids),
                                 "class_names": [f"c{i}" for i in category_ids]}}, path)


def test_weights_from_our_checkpoint_keep_each_class_row_on_its_category_id(tmp_path):
    # An 80-class run (labels 0..79 = COCO ids 1..90 with gaps) fine-tuned on ids 1, 2, 3 (person, bicycle,
    # car): row k must come from the file's row of the same category id, not from row "category id".
    coco_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    source = Named(num_classes=80)
    _our_checkpoint(source, coco_ids, tmp_path / "coco80.pth")
    lines = []
    target = Named(num_classes=3)
    report = load_weights(target, tmp_path / "coco80.pth", category_ids=[1, 2, 3], log=lines.append)
    for layer in range(2):
        assert torch.equal(target.class_embed[layer].weight, source.class_embed[layer].weight[[0, 1, 2]])
        assert torch.equal(target.class_embed[layer].bias, source.class_embed[layer].bias[[0, 1, 2]])
    assert report["mapped"] == ["class_embed.0.weight", "class_embed.0.bias", "class_embed.1.weight",
                                "class_embed.1.bias"]
    assert report["categories_not_in_file"] == [] and report["file_num_classes"] == 80
    assert any("through the file's category map" in line for line in lines)

    # Same head size, other categories: still by id; an id the file lacks keeps its fresh row.
    subset = Named(num_classes=3)
    fresh = subset.class_embed[0].weight.detach().clone()
    _our_checkpoint(target, [1, 2, 3], tmp_path / "three.pth")
    report = load_weights(subset, tmp_path / "three.pth", category_ids=[3, 1, 7], log=lines.append)
    assert torch.equal(subset.class_embed[0].weight[0], target.class_embed[0].weight[2])
    assert torch.equal(subset.class_embed[0].weight[1], target.class_embed[0].weight[0])
    assert torch.equal(subset.class_embed[0].weight[2], fresh[2])
    assert report["categories_not_in_file"] == [7]


def test_weights_map_the_dn_label_book_by_category_id(tmp_path):
    class Book(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.label_enc = nn.Embedding(num_classes + 1, 4)  # last row: "no label"

    source = Book(5)
    _our_checkpoint(source, [2, 4, 6, 8, 10], tmp_path / "book.pth")
    target = Book(2)
    report = load_weights(target, tmp_path / "book.pth", category_ids=[8, 2], log=lambda line: None)
    assert report["mapped"] == ["label_enc.weight"]
    assert torch.equal(target.label_enc.weight, source.label_enc.weight[[3, 0, 5]])


def test_resume_config_check_ignores_only_harmless_fields():
    a = load_config(None, [])
    b = load_config(None, ["train.max_steps=10", "train.epochs=60", "data.num_workers=0"])
    assert config_differences(_as_dict(a), _as_dict(b)) == []
    c = load_config(None, ["model.hidden_dim=128"])
    assert config_differences(_as_dict(a), _as_dict(c)) == ["model.hidden_dim: 256 -> 128"]


def _as_dict(config):
    from detr_cuda.config import config_to_dict
    return config_to_dict(config)


def test_ema_tracks_weights_and_loss_helpers():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # effective decay min(0.5, 2/11)
    expected = model.weight - 1.0 + (1 - 2 / 11) * 1.0
    torch.testing.assert_close(ema.module.weight, expected)
    assert weighted_total({"a": torch.tensor(2.0), "b": torch.tensor(3.0), "c": torch.tensor(9.0)},
                          {"a": 1.0, "b": 2.0}).item() == 8.0
    outputs = {"pred_logits": torch.zeros(1, 2), "aux_outputs": [{"pred_boxes": torch.tensor([float("nan")])}]}
    assert non_finite_outputs(outputs) == ["aux_outputs.0.pred_boxes"]


def test_weights_fill_aliased_head_keys(tmp_path):
    class Refine(nn.Module):
        def __init__(self):
            super().__init__()
            self.bbox_embed = nn.ModuleList([nn.Linear(2, 4)])
            self.transformer = nn.Module()
            self.transformer.decoder = nn.Module()
            self.transformer.decoder.bbox_embed = self.bbox_embed  # shared, as with box refinement

    source = Refine()
    torch.save({"model": {k: v for k, v in source.state_dict().items() if k.startswith("bbox_embed")}},
               tmp_path / "heads_once.pth")
    target = Refine()
    report = load_weights(target, tmp_path / "heads_once.pth", log=lambda line: None)
    assert report["missing"] == [] and torch.equal(target.bbox_embed[0].weight, source.bbox_embed[0].weight)


def test_world_size_change_warning_says_what_changes():
    # 2 processes x batch 2 wrote it in epoch 1 after 1 batch per rank (images 0..3 of the epoch's order).
    fewer = world_size_change_message("ck.pth", 2, 1, TrainState(epoch=1, batch=1, step=3), batch_size=2,
                                      accumulate_steps=1, saved_steps_per_epoch=2, steps_per_epoch=4, lr_drop=7)
    assert "written by 2 processes, this run has 1" in fewer and "re-seeded" in fewer
    assert "images per optimizer step: 4 -> 2" in fewer
    assert "images 0..3 of its order were trained on" in fewer and "the 2 images between are trained on twice" in fewer
    assert "keeps the stored 2 steps per epoch (this run has 4)" in fewer
    # 0-based step 14 is the first after 7 epochs of 2 steps; this run has 3 more steps in epoch 1, then 4 per epoch.
    assert "iteration 15, in epoch 4 of this run (epoch 7 at the stored rate)" in fewer
    more = world_size_change_message("ck.pth", 1, 2, TrainState(epoch=0, batch=2, step=2), batch_size=2,
                                     accumulate_steps=1, saved_steps_per_epoch=4, steps_per_epoch=2, lr_drop=0)
    assert "images per optimizer step: 2 -> 4" in more
    assert "images 4..7 (4) are skipped this epoch" in more
    assert "keeps the stored 4 steps per epoch (this run has 2)" in more and "next drop" not in more
    boundary = world_size_change_message("ck.pth", 2, 4, TrainState(epoch=3, batch=0, step=8), batch_size=2,
                                         accumulate_steps=1, saved_steps_per_epoch=2, steps_per_epoch=2, lr_drop=7)
    assert "trained on" not in boundary and "steps per epoch" not in boundary


@pytest.mark.parametrize("config, overrides, warned", [
    ("deformable_detr.yaml", [], True),                      # the published recipe without ImageNet weights
    ("deformable_detr_refine_dn.yaml", [], True),
    ("deformable_detr.yaml", ["model.backbone_weights=/x/resnet50.pth"], False),
    ("deformable_detr.yaml", ["model.freeze_stem_and_layer1=false"], False),
    ("deformable_detr.yaml", ["model.freeze_stem_and_layer1=false", "model.train_backbone=false"], True),
    ("demo.yaml", [], False),                                 # from scratch, nothing frozen
    ("tiny_coco128.yaml", [], False),
])
def test_training_warns_about_a_random_backbone_kept_partly_frozen(config, overrides, warned):
    from detr_cuda.engine.trainer import random_backbone_frozen_in_part
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", config)
    assert random_backbone_frozen_in_part(load_config(path, overrides).model) == warned
