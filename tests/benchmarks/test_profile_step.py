"""benchmarks/profile_step.py: a profiled training step and inference forward print their tables
(tiny model, small coco128 images)."""
import os
import re
import subprocess
import sys

from tests.support.paths import coco128_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=12", "model.enc_n_points=2",
        "model.dec_n_points=2"]


def run(*arguments):
    environment = dict(os.environ, DETR_CUDA_COCO128=coco128_dir())
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--threads", "1",
                                "--top", "5", *arguments, "--set", *TINY], capture_output=True, text=True,
                               timeout=600, cwd=ROOT, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def operator_rows(text):
    return re.findall(r"^\| `([^`]+)` \| ([\d.]+) \| ([\d.]+)% \| (\d+) \|$", text, flags=re.M)


def test_training_step_tables_for_each_variant():
    out = run("--short-side", "96", "--warmup", "0")
    for variant in ("deformable", "two_stage", "dn"):
        assert f"{variant}, training step (short side 96), batch (2, 3, 96," in out
    assert out.count("phases: forward") == 3 and "optimizer" in out
    rows = operator_rows(out)
    assert len(rows) == 15
    assert all(0 < float(share) <= 100 for _, _, share, _ in rows)
    assert not any(name in ("forward", "criterion", "backward", "optimizer") for name, _, _, _ in rows)


def test_inference_forward_table():
    out = run("--infer", "--variants", "deformable", "--short-side", "96", "--max-size", "160")
    assert "deformable, inference forward" in out and "resized to 96x" in out
    assert len(operator_rows(out)) == 5
