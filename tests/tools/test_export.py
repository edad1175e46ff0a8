"""tools/export.py end to end on a tiny checkpoint of ours."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.support.paths import REPO_ROOT
from tests.support.configs import tiny_detector_config

from detr_cuda.config import config_to_dict
from detr_cuda.models import build_model

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import export as export_tool  # noqa: E402


def test_export_tool_writes_checked_files(tmp_path):
    cfg = tiny_detector_config()
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, 2)
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg),
                "category_map": {"label_to_category_id": [5, 9], "class_names": ["cat", "dog"]}}, checkpoint)
    have_onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))
    out = tmp_path / "exported"
    code = export_tool.main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--height", "64",
                             "--width", "96", "--format", "all" if have_onnx else "torch-export",
                             "model.msda_backend=null"])
    assert code == 0
    with open(out / "export.json") as handle:
        summary = json.load(handle)
    assert summary["category_map"]["label_to_category_id"] == [5, 9]
    assert (summary["height"], summary["width"]) == (64, 96)
    check_preprocessing_recipe(summary["preprocessing"], str(checkpoint))
    assert os.path.isfile(out / "model.pt2")
    assert max(summary["torch_export"]["max_abs_difference"].values()) < 1e-5
    if have_onnx:
        assert os.path.isfile(out / "model.onnx")
        assert max(summary["onnx"]["max_abs_difference"].values()) < 1e-4


def check_preprocessing_recipe(recipe, checkpoint):
    """Following export.json's preprocessing by hand gives what the detector feeds its model."""
    from PIL import Image
    from detr_cuda import Detector
    from detr_cuda.data.transforms import resized_size
    assert recipe["canvas"]["height"] == 64 and recipe["canvas"]["width"] == 96
    assert recipe["resize"]["interpolation"] == "bilinear"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 150, 3), dtype=np.uint8))
    height, width = resized_size(image.size, recipe["resize"]["short_side"], recipe["resize"]["max_size"])
    pixels = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255
    by_hand = (pixels - np.array(recipe["normalize"]["mean"])) / np.array(recipe["normalize"]["std"])
    expected = Detector.from_checkpoint(checkpoint, device="cpu").preprocess(image)
    np.testing.assert_allclose(by_hand.transpose(2, 0, 1), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag, value", [("--height", "0"), ("--width", "-5"), ("--batch-size", "0"),
                                         ("--height", "tall")])
def test_export_tool_rejects_non_positive_sizes(flag, value, tmp_path, capsys):
    # --height 0 used to become the default canvas silently (args.height or ...)
    with pytest.raises(SystemExit) as exit_info:
        export_tool.main(["--checkpoint", str(tmp_path / "never_read.pth"), "--output-dir", str(tmp_path / "out"),
                          flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer" in err and value in err
    assert not (tmp_path / "out").exists()


def test_export_tool_help_says_the_default_canvas_is_landscape(capsys):
    with pytest.raises(SystemExit):
        export_tool.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "is landscape" in out and "portrait images need --height/--width" in out
