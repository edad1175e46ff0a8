"""SIGTERM finishes the step and checkpoints; a non-finite loss stops with a clear message and a checkpoint."""
import os
import signal
import subprocess
import sys
import time

import torch

from train_helpers import REPO_ROOT, TRAIN, env, explain, read_log, tiny_args, train, write_fixed_coco

# Generous bound for a tiny run to end once it failed: exceeding it means it hangs.
HANG_LIMIT_S = 120


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


def _session_processes(session_id):
    """Pids of the live (non-zombie) processes of a session (the run and its DataLoader workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _finish(process):
    """(stdout, stderr, pids left in its session) of a run in its own session; kills it on a hang."""
    try:
        stdout, stderr = process.communicate(timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the run did not exit within {HANG_LIMIT_S} s (hang)\n{stdout[-2000:]}\n{stderr[-2000:]}")
    time.sleep(0.5)  # a worker that outlived its parent would still be listed
    left = _session_processes(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    return stdout, stderr, left


def test_a_failure_with_loader_workers_exits_non_zero_and_stops_the_workers(tmp_path):
    # A worker fails mid-epoch (an unreadable image); the workers ignore SIGTERM, and the process
    # used to hang at exit in multiprocessing's join of them.
    data = write_fixed_coco(tmp_path / "coco", num_images=4)
    (tmp_path / "coco" / "images" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    args = tiny_args(tmp_path, extra=[*data, "data.check_images=none", "data.num_workers=1",
                                      "train.max_steps=100000"])
    process = subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env(), cwd=REPO_ROOT, start_new_session=True)
    stdout, stderr, left = _finish(process)
    assert process.returncode not in (0, None), (stdout[-3000:], stderr[-3000:])
    assert "cannot read image" in stderr and "0003.png" in stderr, stderr[-3000:]
    assert not left, f"processes left behind: {left}"


def test_a_second_ctrl_c_interrupts_at_once_with_loader_workers(tmp_path):
    # Ctrl-C reaches the whole group; the second one raises KeyboardInterrupt in the main process.
    # Four micro-batches per step keep the first stop request pending while the second arrives.
    args = tiny_args(tmp_path, extra=["train.max_steps=100000", "data.num_workers=1", "train.accumulate_steps=4",
                                      "data.synthetic_train_images=16"])
    process = subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        log = tmp_path / "run" / "log.jsonl"
        deadline = time.time() + HANG_LIMIT_S
        while not (log.exists() and log.read_text().count('"train_interval"') >= 1):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    stdout, stderr, left = _finish(process)
    assert process.returncode not in (0, None), (stdout[-3000:], stderr[-3000:])
    assert "KeyboardInterrupt" in stderr, stderr[-3000:]
    assert "stopped by SIGINT" not in stdout
    assert not left, f"processes left behind: {left}"
