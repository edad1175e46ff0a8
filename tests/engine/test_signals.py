"""SIGTERM finishes the step and checkpoints; a non-finite loss stops with a clear message and a checkpoint."""
import os
import signal
import subprocess
import sys
import time

import torch

from tests.support.launch import REPO_ROOT, TRAIN, env, explain, read_log, run, tiny_args, train, write_fixed_coco

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


# tools/train.py, except that optimizer step BLOW_STEP blows the weights up (x 1e30, finite), as an
# absurd learning rate or an unstable run does: the next forward's loss is non-finite.
BLOWING_UP_TRAIN = f"""
import os, runpy, sys
import torch
from detr_cuda.engine import trainer
optimizer_step = trainer.Trainer.optimizer_step
def step_then_blow_up(self):
    optimizer_step(self)
    if self.state.step == int(os.environ["BLOW_STEP"]):
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.mul_(1e30)
trainer.Trainer.optimizer_step = step_then_blow_up
sys.argv[0] = {TRAIN!r}
runpy.run_path({TRAIN!r}, run_name="__main__")
"""


def blowing_up(args, step):
    return run([sys.executable, "-c", BLOWING_UP_TRAIN, *args], env={**env(), "BLOW_STEP": str(step)})


def test_a_non_finite_loss_stops_and_leaves_the_last_good_checkpoint_untouched(tmp_path):
    # Checkpoints every 3 steps: step 3 is written healthy, step 4 blows up, step 5's loss is non-finite.
    args = tiny_args(tmp_path, extra=["train.max_steps=20", "train.checkpoint_every_steps=3", "train.checkpoint_every=100"])
    result = blowing_up(args, 4)
    assert result.returncode == 1, explain(result)
    assert "non-finite loss at iteration 5" in result.stderr
    assert "loss_" in result.stderr and "image ids" in result.stderr
    last, failed = tmp_path / "run" / "checkpoint_last.pth", tmp_path / "run" / "checkpoint_non_finite.pth"
    assert f"The last good state is {last} (iteration 3, untouched)" in result.stderr
    assert f"The failing state is in {failed}" in result.stderr
    good = torch.load(last, weights_only=True)
    assert good["step"] == 3
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e6 for v in good["model"].values() if v.is_floating_point())
    assert torch.load(failed, weights_only=True)["model"]["class_embed.0.bias"].abs().max() > 1e20
    # The healthy checkpoint is the one the step-3 run wrote, byte for byte.
    straight = train(tiny_args(tmp_path, "straight", ["train.max_steps=3"]))
    assert straight.returncode == 0, explain(straight)
    reference = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, good["model"][name]), name
    # And the run continues from it, with a changed config that takes effect.
    resumed = train(["--resume", "auto", "--allow-config-change", *tiny_args(
        tmp_path, extra=["train.max_steps=5", "train.checkpoint_every_steps=3", "train.checkpoint_every=100",
                         "train.lr=1e-5"])])
    assert resumed.returncode == 0, explain(resumed)
    assert "train.lr: 0.0004 -> 1e-05" in resumed.stdout
    assert [r["lr_main"] for r in read_log(tmp_path / "run", "train_interval")][-2:] == [1e-5, 1e-5]


def test_tolerated_bad_steps_are_skipped(tmp_path):
    result = blowing_up(tiny_args(tmp_path, extra=["train.max_steps=6", "train.max_bad_steps=2"]), 1)
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
    # A worker fails mid-epoch (an image file that is gone; a broken one would be replaced); the
    # workers ignore SIGTERM, and the process used to hang at exit in multiprocessing's join of them.
    data = write_fixed_coco(tmp_path / "coco", num_images=4)
    (tmp_path / "coco" / "images" / "0003.png").unlink()
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
    # 48 micro-batches make a step of about a second, so the first stop request is still pending
    # (it is honoured at the step's end) when the second arrives 0.1 s later; with 4 (~0.1 s a
    # step) the run had sometimes already stopped and saved, and exited 0.
    args = tiny_args(tmp_path, extra=["train.max_steps=100000", "data.num_workers=1", "train.accumulate_steps=48",
                                      "data.synthetic_train_images=192"])
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
    assert "KeyboardInterrupt" in stderr, (process.returncode, stdout[-3000:], stderr[-3000:])
    assert "stopped by SIGINT" not in stdout
    assert not left, f"processes left behind: {left}"


def test_an_image_corrupt_in_its_middle_is_replaced_and_counted(tmp_path):
    """A JPEG whose header is fine (it passes the start-up check) but whose data is broken: the run
    goes on with the next readable image in its place, says which file once, and counts it."""
    from PIL import Image
    data = write_fixed_coco(tmp_path / "coco", num_images=4)
    images = tmp_path / "coco" / "images"
    Image.open(images / "0002.png").save(images / "0002.jpg", quality=95)
    broken = bytearray((images / "0002.jpg").read_bytes())
    start_of_scan = broken.find(b"\xff\xda")
    broken[start_of_scan + 4:start_of_scan + 7] = b"\xff\xff\xff"  # PIL: "broken data stream"; still ends as a JPEG
    (images / "0002.jpg").write_bytes(bytes(broken))
    (images / "0002.png").unlink()
    annotations = tmp_path / "coco" / "annotations.json"
    annotations.write_text(annotations.read_text().replace("0002.png", "0002.jpg"))
    result = train(tiny_args(tmp_path, extra=[*data, "train.max_steps=4", "train.epochs=2"]))
    assert result.returncode == 0, explain(result)
    assert result.stderr.count("0002.jpg") == 1 and "uses the next readable image" in result.stderr
    assert "1 image(s) could not be decoded this epoch and were replaced" in result.stdout
    assert [r["substituted_images"] for r in read_log(tmp_path / "run", "epoch")] == [1, 1]
