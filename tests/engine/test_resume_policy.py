"""The resume policy: which config changes a resumed run takes, the world-size warning, random streams."""
import random

import numpy as np
import pytest
import torch

from detr_cuda.checkpoint import save_atomic
from detr_cuda.config import config_to_dict, load_config
from detr_cuda.engine.resume import (ResumeConfigMismatch, TrainState, capture_rng_state, comparable,
                                     config_changes, restore_rng_state, world_size_change_message)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_atomic({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_config_changes_are_sorted_into_harmless_effective_and_fixed():
    a = load_config(None, [])
    b = load_config(None, ["train.max_steps=10", "train.epochs=60", "data.num_workers=0", "eval.batch_size=1"])
    assert config_changes(config_to_dict(a), config_to_dict(b))[1:] == ([], [])
    c = load_config(None, ["train.lr=1e-5", "loss.giou_loss_coef=3", "dn.box_noise_scale=0.2"])
    harmless, effective, fixed = config_changes(config_to_dict(a), config_to_dict(c))
    assert harmless == [] and fixed == []
    assert effective == ["dn.box_noise_scale: 0.4 -> 0.2", "loss.giou_loss_coef: 2.0 -> 3.0", "train.lr: 0.0002 -> 1e-05"]
    d = load_config(None, ["model.hidden_dim=128", "train.batch_size=4"])
    assert config_changes(config_to_dict(a), config_to_dict(d))[2] == ["model.hidden_dim: 256 -> 128",
                                                                        "train.batch_size: 2 -> 4"]


def test_fields_a_saved_config_lacks_count_as_their_defaults():
    """A run started before model.backbone_levels and the position-encoding fields existed resumes."""
    current = config_to_dict(load_config(None, []))
    older = config_to_dict(load_config(None, []))
    for field in ("backbone_levels", "position_temperature", "position_offset"):
        del older["model"][field]
    assert config_changes(comparable(older), comparable(current)) == ([], [], [])
    dino = config_to_dict(load_config(None, ["model.position_temperature=20"]))
    assert config_changes(comparable(older), comparable(dino))[2] == ["model.position_temperature: 10000.0 -> 20.0"]


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


def test_naming_the_same_data_another_way_is_no_change(tmp_path, monkeypatch):
    """A run saved before data.format / data.root existed, with paths relative to its folder, resumes
    with today's config that names the same files through data.root (resolved, absolute)."""
    from detr_cuda.engine.resume import check_config_change
    monkeypatch.chdir(tmp_path)
    saved = config_to_dict(load_config(None, []))
    for section in ("train", "val"):
        saved["data"][f"{section}_images"] = f"coco/{section}2017"
        saved["data"][f"{section}_annotations"] = f"coco/annotations/instances_{section}2017.json"
    del saved["data"]["format"], saved["data"]["root"]
    current = config_to_dict(load_config(None, [f"data.root={tmp_path / 'coco'}"]))
    assert check_config_change(saved, current, "ck.pth", allow_config_change=False) == []
    moved = config_to_dict(load_config(None, [f"data.root={tmp_path / 'coco'}", "data.train_images=other/images"]))
    with pytest.raises(ResumeConfigMismatch, match="data.train_sources"):
        check_config_change(saved, moved, "ck.pth", allow_config_change=False)
    elsewhere = config_to_dict(load_config(None, [f"data.root={tmp_path / 'coco'}", "data.val_images=other/images"]))
    assert check_config_change(saved, elsewhere, "ck.pth", allow_config_change=False) == []  # validation: harmless
