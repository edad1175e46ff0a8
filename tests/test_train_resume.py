"""--resume continues the same run exactly; --resume and --weights are different things."""
import torch

from train_helpers import explain, read_log, tiny_args, train

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
