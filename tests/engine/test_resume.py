"""--resume continues the same run exactly; --resume and --weights are different things."""
import sys

import torch

from tests.support.launch import TRAIN, env, explain, read_log, run, tiny_args, train

STEPS = ["train.deterministic=true"]  # 8 images, batch 2: 4 steps per epoch


def _losses(output_dir):
    return {r["iteration"]: r for r in read_log(output_dir, "train_interval")}


def test_stop_and_resume_equals_straight_run(tmp_path):
    # Straight: 6 steps (crosses the epoch boundary after step 4). Interrupted: 3 steps, then resume to 6.
    straight = train(tiny_args(tmp_path, "straight", [*STEPS, "train.max_steps=6"]))
    assert straight.returncode == 0, explain(straight)
    first = train(tiny_args(tmp_path, "resumed", [*STEPS, "train.max_steps=3"]))
    assert first.returncode == 0, explain(first)
    second = train(["--resume", "auto", *tiny_args(tmp_path, "resumed", [*STEPS, "train.max_steps=6"])])
    assert second.returncode == 0, explain(second)
    assert "resumed" in second.stdout and "step 3" in second.stdout

    reference, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(reference) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key, value in reference[step].items():
            if key.startswith("loss") or key in ("grad_norm", "lr_main"):
                assert resumed[step][key] == value, (step, key, value, resumed[step][key])
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pth", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["next_epoch"] == b["next_epoch"] == 1
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_resume_refuses_a_changed_config_and_weights_only_initialise(tmp_path):
    first = train(tiny_args(tmp_path, "run", ["train.max_steps=2"]))
    assert first.returncode == 0, explain(first)
    changed = train(["--resume", "auto", *tiny_args(tmp_path, "run", ["train.max_steps=4", "train.lr=1e-3"])])
    assert changed.returncode == 2
    assert "train.lr: 0.0004 -> 0.001" in changed.stderr and "--allow-config-change" in changed.stderr
    fixed = train(["--resume", "auto", "--allow-config-change",
                   *tiny_args(tmp_path, "run", ["train.max_steps=4", "model.num_queries=6", "train.lr=1e-3"])])
    assert fixed.returncode == 2, explain(fixed)
    assert "cannot change in the middle of a run:\n  model.num_queries: 8 -> 6" in fixed.stderr
    assert "train.lr" not in fixed.stderr and "--weights" in fixed.stderr
    again = train(tiny_args(tmp_path, "run", ["train.max_steps=4"]))  # same folder, no --resume
    assert again.returncode == 2 and "--resume auto" in again.stderr

    # --weights starts a new run (step 0) from the weights, with a different number of classes here.
    weights = tmp_path / "run" / "checkpoint_last.pth"
    fine_tune = train(["--weights", str(weights), *tiny_args(tmp_path, "finetune", [
        "train.max_steps=1", "data.synthetic_dir=" + str(tmp_path / "other_synthetic")])])
    assert fine_tune.returncode == 0, explain(fine_tune)
    assert "tensors loaded" in fine_tune.stdout
    checkpoint = torch.load(tmp_path / "finetune" / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["step"] == 1
    both = train(["--weights", str(weights), "--resume", "auto", *tiny_args(tmp_path, "x")])
    assert both.returncode == 2 and "Use one of them" in both.stderr


def test_resume_path_writes_beside_the_checkpoint_not_into_the_stored_folder(tmp_path):
    import shutil
    first = train(tiny_args(tmp_path, "original", ["train.max_steps=2"]))
    assert first.returncode == 0, explain(first)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    original_bytes = (tmp_path / "original" / "checkpoint_last.pth").read_bytes()

    # --resume PATH alone: the stored config names "original" as output folder; the run must go on in "copy".
    resumed = train(["--resume", str(tmp_path / "copy" / "checkpoint_last.pth"), "train.max_steps=3"])
    assert resumed.returncode == 0, explain(resumed)
    assert (tmp_path / "original" / "checkpoint_last.pth").read_bytes() == original_bytes
    assert torch.load(tmp_path / "copy" / "checkpoint_last.pth", weights_only=True)["step"] == 3

    # Told to write into a folder holding another run's checkpoint: a clear refusal, nothing overwritten.
    clash = train(["--resume", str(tmp_path / "copy" / "checkpoint_last.pth"), "train.max_steps=4",
                   f"train.output_dir={tmp_path / 'original'}"])
    assert clash.returncode == 2, explain(clash)
    assert "holds another checkpoint_last.pth" in clash.stderr and "Traceback" not in clash.stderr
    assert (tmp_path / "original" / "checkpoint_last.pth").read_bytes() == original_bytes


# tools/train.py, except that the process dies (os._exit: no checkpoint, no clean-up, like SIGKILL)
# right after optimizer step CRASH_STEP has been logged.
CRASHING_TRAIN = f"""
import os, runpy, sys
from detr_cuda.engine import trainer
log_interval = trainer.Trainer.log_interval
def log_then_die(self):
    log_interval(self)
    if self.state.step == int(os.environ["CRASH_STEP"]):
        os._exit(9)
trainer.Trainer.log_interval = log_then_die
sys.argv[0] = {TRAIN!r}
runpy.run_path({TRAIN!r}, run_name="__main__")
"""


def test_step_checkpoints_let_a_killed_run_resume_exactly(tmp_path):
    # 4 steps per epoch, no per-epoch checkpoint: only train.checkpoint_every_steps=3 writes mid-run.
    config = [*STEPS, "train.checkpoint_every=100", "train.checkpoint_every_steps=3", "train.max_steps=6"]
    straight = train(tiny_args(tmp_path, "straight", config))
    assert straight.returncode == 0, explain(straight)
    crash_env = {**env(), "CRASH_STEP": "5"}
    crashed = run([sys.executable, "-c", CRASHING_TRAIN, *tiny_args(tmp_path, "killed", config)], env=crash_env)
    assert crashed.returncode == 9, explain(crashed)
    assert "checkpoint at iteration 3 (epoch 0, batch 3)" in crashed.stdout, explain(crashed)
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint_last.pth", weights_only=True)
    assert (checkpoint["step"], checkpoint["next_epoch"], checkpoint["next_batch"]) == (3, 0, 3)

    resumed = train(["--resume", "auto", *tiny_args(tmp_path, "killed", config)])
    assert resumed.returncode == 0, explain(resumed)
    assert "epoch 0, batch 3, step 3" in resumed.stdout
    reference = _losses(tmp_path / "straight")
    continued = _losses(tmp_path / "killed")  # the resumed run's records replace the killed run's 4 and 5
    for step in (4, 5, 6):
        for key, value in reference[step].items():
            if key.startswith("loss") or key in ("grad_norm", "lr_main"):
                assert continued[step][key] == value, (step, key, value, continued[step][key])
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint_last.pth", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


# tools/train.py, except that the end-of-epoch evaluation first reports what checkpoint_last.pth
# holds and then receives a SIGINT, as if Ctrl-C (or Slurm's SIGTERM) came while it ran.
SIGNAL_DURING_EVALUATION = f"""
import os, runpy, signal, sys
import torch
from detr_cuda.engine import trainer
evaluate = trainer.Trainer.run_evaluation
def interrupted_evaluation(self, epoch):
    path = os.path.join(self.output_dir, "checkpoint_last.pth")
    step = torch.load(path, weights_only=True)["step"] if os.path.exists(path) else None
    print(f"BEFORE EVALUATION: checkpoint step {{step}}, trainer step {{self.state.step}}", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    return evaluate(self, epoch)
trainer.Trainer.run_evaluation = interrupted_evaluation
sys.argv[0] = {TRAIN!r}
runpy.run_path({TRAIN!r}, run_name="__main__")
"""


def test_a_signal_during_evaluation_stops_after_it_with_the_epoch_saved(tmp_path):
    config = [*STEPS, "train.epochs=3", "train.eval_every=1"]
    result = run([sys.executable, "-c", SIGNAL_DURING_EVALUATION, *tiny_args(tmp_path, "run", config)], env=env())
    assert result.returncode == 0, explain(result)
    # The epoch (4 steps) was on disk before the evaluation began ...
    assert "BEFORE EVALUATION: checkpoint step 4, trainer step 4" in result.stdout, explain(result)
    # ... and the run stops right after the evaluation, without a step of the next epoch.
    assert "stopped by SIGINT at iteration 4" in result.stdout, explain(result)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert (checkpoint["step"], checkpoint["next_epoch"], checkpoint["next_batch"]) == (4, 1, 0)
    assert (tmp_path / "run" / "checkpoint_best.pth").exists()  # the evaluation's result is kept too
