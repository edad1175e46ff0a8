"""Training options end to end: bf16/fp16 autocast, EMA, gradient accumulation, LR warm-up."""
import pytest
import torch

from tests.support.launch import explain, read_log, tiny_args, train


def test_bf16_ema_accumulation_and_warmup(tmp_path):
    result = train(tiny_args(tmp_path, extra=["train.amp=bf16", "train.ema=true", "train.accumulate_steps=2",
                                              "train.warmup_steps=2", "train.max_steps=2", "train.eval_every=0"]))
    assert result.returncode == 0, explain(result)
    intervals = read_log(tmp_path / "run", "train_interval")
    # 8 images, batch 2, 2 batches per step: each step consumed two batches.
    assert [(r["iteration"], r["batch"]) for r in intervals] == [(1, 2), (2, 4)]
    assert [r["lr_main"] for r in intervals] == pytest.approx([2e-4, 4e-4])  # warm-up ramp of lr 4e-4
    assert read_log(tmp_path / "run", "eval")[0]["ema"] is True
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["ema"]["updates"] == 2 and checkpoint["scaler"] is None


def test_fp16_keeps_a_grad_scaler_in_the_checkpoint(tmp_path):
    result = train(tiny_args(tmp_path, extra=["train.amp=fp16", "train.max_steps=2"]))
    assert result.returncode == 0, explain(result)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["scaler"] is not None and checkpoint["scaler"]["scale"] > 0
