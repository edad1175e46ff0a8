"""bench_model.py --mode infer (CPU inference, batch 1, a real image resized as evaluation does):
ours with the cpu kernel, ours with the reference op and the ONNX export under onnxruntime, on a
tiny model and image."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "bench_model.py")
TINY = ["model.backbone=resnet18", "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=12", "model.enc_n_points=2",
        "model.dec_n_points=2"]


def test_infer_mode_gives_a_row_per_backend(tmp_path):
    pytest.importorskip("onnxruntime")
    image = tmp_path / "photo.png"
    Image.new("RGB", (90, 60), (120, 30, 200)).save(image)  # 60 x 90 (h x w)
    out = tmp_path / "rows.json"
    completed = subprocess.run(
        [sys.executable, BENCH, "--mode", "infer", "--device", "cpu", "--set", *TINY, "--image", str(image),
         "--short-side", "64", "--max-size", "128", "--iterations", "1", "--warmup", "0", "--threads", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["backend"] for row in rows] == ["cpu", "reference", "onnx"]
    for row in rows:
        # Resized as evaluation does: short side 64, the long side scaled with it (90 * 64 / 60 = 96).
        assert (row["height"], row["width"]) == (64, 96)
        assert row["image"].startswith("photo.png 60x90 resized to 64x96")
        assert row["ms_per_image"] > 0 and row["peak_mib"] > 0
    assert "inference, batch 1" in completed.stdout and "onnx" in completed.stdout


def test_compiled_row_runs_the_model_under_torch_compile(tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (48, 32), (20, 130, 60)).save(image)
    out = tmp_path / "rows.json"
    completed = subprocess.run(
        [sys.executable, BENCH, "--mode", "infer", "--device", "cpu", "--set", *TINY, "--image", str(image),
         "--short-side", "32", "--max-size", "64", "--iterations", "1", "--warmup", "1", "--threads", "1",
         "--backends", "compiled", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["backend"] for row in rows] == ["compiled"] and rows[0]["ms_per_image"] > 0


def test_default_image_is_the_coco128_one_nearest_800x1333(tmp_path, monkeypatch):
    folder = tmp_path / "coco128"
    (folder / "images").mkdir(parents=True)
    entries = [("square.jpg", 500, 500), ("wide.jpg", 480, 800), ("tall.jpg", 640, 427)]
    for name, height, width in entries:
        (folder / "images" / name).write_bytes(b"")
    (folder / "annotations.json").write_text(json.dumps(
        {"images": [{"file_name": n, "height": h, "width": w} for n, h, w in entries]}))
    monkeypatch.setenv("DETR_CUDA_COCO128", str(folder))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_infer", os.path.join(ROOT, "benchmarks", "bench_infer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(image=None, short_side=800, max_size=1333)
    # 480x800 resizes to exactly 800x1333; the square to 800x800, the portrait to 1199x800.
    assert os.path.basename(bench.pick_image(args)) == "wide.jpg"
    # Without coco128 the benchmark still runs, on random pixels of the requested canvas.
    monkeypatch.setattr(bench, "coco128_dir", lambda: None)
    images, mask, description = bench.load_image(argparse.Namespace(image=None, short_side=32, max_size=48))
    assert images.shape == (1, 3, 32, 48) and mask.shape == (1, 32, 48) and not mask.any()
    assert description.startswith("random 32x48")
