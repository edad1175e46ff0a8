"""The public Python API: ``detr_cuda.Detector`` / ``predict`` on every input kind, equal to what
tools/infer.py writes, and ``detr_cuda.build``; ``import detr_cuda`` stays light."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detr_cuda
from detr_cuda.config import ConfigError
from tests.support.configs import MODEL_TINY, tiny_model_config
from tests.support.paths import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import infer as infer_tool  # noqa: E402


def test_import_is_light_and_names_resolve_lazily():
    probe = ("import sys, detr_cuda; assert 'torch' not in sys.modules, 'torch imported'; "
             "assert 'Detector' in dir(detr_cuda); detr_cuda.Detector; assert 'torch' in sys.modules")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from detr_cuda.inference.detector import Detector
    assert detr_cuda.Detector is Detector
    with pytest.raises(AttributeError, match="no attribute 'Detectr'"):
        detr_cuda.Detectr  # noqa: B018


def test_build_from_a_config_a_file_or_overrides(tmp_path):
    config = tiny_model_config()
    model, criterion, postprocessor = detr_cuda.build(config, ["model.two_stage=true"], num_classes=3)
    assert model.two_stage and not config.model.two_stage  # the caller's Config is not changed
    assert model.class_embed[0].out_features == 3
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    outputs = model(images, mask)
    assert outputs["pred_logits"].shape == (1, config.model.num_queries, 3)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}]
    assert set(criterion.weight_dict) <= set(criterion(outputs, targets))
    (detections,) = postprocessor(outputs, torch.tensor([[480, 640]]))
    assert detections["boxes"].shape == (min(config.eval.num_select, config.model.num_queries * 3), 4)

    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n" + "".join(f"  {o.split('=')[0].split('.')[1]}: {o.split('=')[1]}\n"
                                          for o in MODEL_TINY))
    built = detr_cuda.build(str(path), ["model.num_classes=5"])
    assert built.model.class_embed[0].out_features == 5 and built.postprocessor.num_select == 100
    with pytest.raises(ConfigError, match="model.hidden_dimm"):
        detr_cuda.build(None, ["model.hidden_dimm=64"], num_classes=2)
    with pytest.raises(TypeError, match="config must be"):
        detr_cuda.build(42, num_classes=2)


def _inputs(folder):
    """Three images written as files (an RGB PNG, a grayscale PNG, an RGBA PNG)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"1.png": rng.integers(0, 255, (70, 90, 3), dtype=np.uint8),
              "2.png": rng.integers(0, 255, (80, 60), dtype=np.uint8),
              "3.png": rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name)
    return arrays


def _same(a, b):
    assert a["names"] == b["names"]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key])


def test_predict_takes_every_input_kind_and_equals_infer_json(tiny_trained, tmp_path):
    checkpoint, _ = tiny_trained
    detector = detr_cuda.Detector.from_checkpoint(checkpoint, device="cpu")
    arrays = _inputs(tmp_path / "in")
    paths = [tmp_path / "in" / name for name in arrays]
    # Batch size 1: a batch pads its images to the largest, which shifts scores slightly (engine/evaluate.py).
    by_path = detector.predict([str(p) for p in paths], score_threshold=0.0, batch_size=1)
    assert isinstance(by_path, list) and len(by_path) == 3
    assert len(detector.predict(tuple(arrays.values()))) == 3
    for path, array, expected in zip(paths, arrays.values(), by_path):
        assert set(expected) == {"boxes", "scores", "labels", "names"}
        assert expected["boxes"].dtype == torch.float32 and expected["labels"].dtype == torch.int64
        assert len(expected["names"]) == len(expected["scores"]) > 0
        _same(detector.predict(path, score_threshold=0.0), expected)             # one pathlib.Path -> one dict
        _same(detector.predict(array, score_threshold=0.0), expected)            # numpy (H, W), (H, W, 3), RGBA
        _same(detector.predict(Image.open(path), score_threshold=0.0), expected)  # PIL
    strict = detector.predict(str(paths[0]), score_threshold=0.2)
    assert (strict["scores"] >= 0.2).all() and len(strict["scores"]) <= len(by_path[0]["scores"])
    assert strict["scores"].tolist() == sorted(strict["scores"].tolist(), reverse=True)
    names = dict(zip(detector.category_map.label_to_category_id, detector.category_map.class_names))
    assert all(names[c] == n for r in by_path for c, n in zip(r["labels"].tolist(), r["names"]))

    out = tmp_path / "out"
    assert infer_tool.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "in"), "--output-dir", str(out),
                            "--device", "cpu", "--no-draw", "--batch-size", "1"]) == 0
    written = json.loads((out / "results.json").read_text())
    for path, expected in zip(paths, by_path):
        rows = [r for r in written if r["file_name"] == path.name]
        assert [r["image_id"] for r in rows] == [int(path.stem)] * len(rows)
        assert [r["category_id"] for r in rows] == expected["labels"].tolist()
        assert [r["category_name"] for r in rows] == expected["names"]
        assert [r["score"] for r in rows] == pytest.approx(expected["scores"].tolist(), abs=1e-5)
        boxes = expected["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        assert sum((r["bbox"] for r in rows), []) == pytest.approx(boxes.flatten().tolist(), abs=0.01)


def test_predict_refuses_what_is_not_an_image(tiny_trained):
    detector = detr_cuda.Detector.from_checkpoint(tiny_trained[0], device="cpu")
    with pytest.raises(TypeError, match="got int"):
        detector.predict(3)
    with pytest.raises(ValueError, match="uint8"):
        detector.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError):
        detector.predict(Path("no_such_image.jpg"))
