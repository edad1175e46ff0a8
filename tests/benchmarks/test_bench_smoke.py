"""The training benchmarks run end to end on a tiny budget (their tables are only as good as this)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_dn_prints_a_row_per_variant(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_dn.py"), "--steps", "2", "--train-images", "8",
         "--val-images", "4", "--image-size", "64", "--threads", "1", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| ") and "| 2 |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["DN off", "DN on", "contrastive DN", "DINO"]


def test_bench_model_measures_every_precision(tmp_path):
    """One float32 and one bfloat16-autocast step of the small CPU model; rows in the JSON."""
    out = tmp_path / "rows.json"
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_model.py"), "--device", "cpu", "--backends", "cpu",
         "--amp", "none", "bf16", "--iterations", "1", "--warmup", "0", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["backend"], row["amp"]) for row in rows] == [("cpu", "none"), ("cpu", "bf16")]
    assert all(row["images_per_s"] > 0 and row["peak_mib"] > 0 for row in rows)
