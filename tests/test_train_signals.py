"""SIGTERM finishes the step and checkpoints; a non-finite loss stops with a clear message and a checkpoint."""
import os
import signal
import subprocess
import sys
import time

import torch

from train_helpers import REPO_ROOT, TRAIN, env, explain, read_log, tiny_args, train


def test_sigterm_to_the_process_group_writes_a_checkpoint_and_exits_0(tmp_path):
    # One loader worker: the signal reaches it too (as with Ctrl-C or Slurm) and must not crash the run.
    args = tiny_args(tmp_path, extra=["train.max_steps=100000", "data.num_workers=1"])
    process = subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        log = tmp_path / "run" / "log.jsonl"
        deadline = time.time() + 120
        while not (log.exists() and log.read_text().count('"train_interval"') >= 2):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, (stdout[-3000:], stderr[-3000:])
    assert "stopped by SIGTERM" in stdout
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    last_logged = read_log(tmp_path / "run", "train_interval")[-1]["iteration"]
    assert checkpoint["step"] >= last_logged >= 2


def test_non_finite_loss_stops_with_the_iteration_terms_and_a_checkpoint(tmp_path):
    # An absurd learning rate: the first step is finite, the weights then blow up.
    result = train(tiny_args(tmp_path, extra=["train.max_steps=20", "train.lr=1e30", "train.lr_backbone=1e30",
                                              "train.clip_max_norm=0"]))
    assert result.returncode == 1, explain(result)
    assert "non-finite loss at iteration" in result.stderr
    assert ("loss_" in result.stderr or "pred_boxes" in result.stderr) and "image ids" in result.stderr
    assert "last good state is saved" in result.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    iteration = int(result.stderr.split("non-finite loss at iteration ")[1].split()[0])
    assert checkpoint["step"] == iteration - 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()) \
        or checkpoint["step"] >= 1


def test_tolerated_bad_steps_are_skipped(tmp_path):
    result = train(tiny_args(tmp_path, extra=["train.max_steps=4", "train.lr=1e30", "train.lr_backbone=1e30",
                                              "train.clip_max_norm=0", "train.max_bad_steps=2"]))
    assert result.returncode == 1, explain(result)
    assert result.stdout.count("skipping it") == 2
