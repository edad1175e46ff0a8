"""Per-class AP bars and precision-recall curves written next to eval.json (matplotlib optional)."""
import io
import json
import os
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support.paths import REPO_ROOT

from detr_cuda.data.coco import coco_from_dict, load_instances_json
from detr_cuda.data.coco_eval import evaluate_coco, write_eval_files
from detr_cuda.data.synthetic import generate_synthetic_coco
from detr_cuda.checkpoint import load_file
from detr_cuda.inference import eval_plots


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """eval.json + detections.json of noisy copies of the ground truth of 12 generated images."""
    root = tmp_path_factory.mktemp("eval_plots")
    paths = generate_synthetic_coco(str(root / "shapes"), num_images=12, image_size=64, seed=3)
    coco_gt = coco_from_dict(load_instances_json(paths["annotations"]))
    rng = np.random.default_rng(0)
    results = []
    for annotation in coco_gt.dataset["annotations"]:
        x, y, w, h = annotation["bbox"]
        jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
        results.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                        "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                        "score": float(rng.uniform(0.3, 1.0))})
        results.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                        "bbox": [rng.uniform(0, 40), rng.uniform(0, 40), 10.0, 10.0],
                        "score": float(rng.uniform(0.0, 0.5))})
    metrics = evaluate_coco(coco_gt, results, sorted(coco_gt.imgs))
    out_dir = root / "eval"
    write_eval_files(str(out_dir), metrics, results)
    return out_dir, paths["annotations"], metrics


def _open_png(path):
    with Image.open(path) as picture:
        picture.load()
        assert picture.format == "PNG"
        return picture.size


def test_plots_next_to_eval_json(evaluated):
    pytest.importorskip("matplotlib")
    out_dir, annotations, metrics = evaluated
    assert 0.2 < metrics["metrics"]["AP50"] <= 1.0  # the noisy copies are mostly right: a real curve, not a flat line
    written = eval_plots.write_eval_plots(str(out_dir / "eval.json"), coco_gt=annotations)
    assert written == [str(out_dir / eval_plots.AP_BARS_FILE), str(out_dir / eval_plots.PR_CURVE_FILE)]
    for path in written:
        width, height = _open_png(path)
        assert width > 300 and height > 200


def test_bars_only_without_ground_truth_and_from_coco_eval(evaluated, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir, annotations, _ = evaluated
    log = io.StringIO()
    written = eval_plots.write_eval_plots(str(out_dir / "eval.json"), out_dir=str(tmp_path / "a"), log=log)
    assert written == [str(tmp_path / "a" / eval_plots.AP_BARS_FILE)]
    assert "precision-recall curve skipped" in log.getvalue()
    with open(out_dir / "eval.json") as handle:
        metrics = json.load(handle)
    assert eval_plots.write_eval_plots(metrics, out_dir=str(tmp_path / "b")) == [
        str(tmp_path / "b" / eval_plots.AP_BARS_FILE)]
    precision, category_ids, names = eval_plots.precision_table(annotations, str(out_dir / "detections.json"))
    assert precision.shape[2] == len(category_ids) == 4
    assert set(names.values()) == {"circle", "square", "triangle", "cross"}


def test_bad_sources(evaluated, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="per_class"):
        eval_plots.write_eval_plots({"AP": 0.1}, out_dir=str(tmp_path))
    with pytest.raises(TypeError, match="eval.json path"):
        eval_plots.write_eval_plots(3, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no class has an AP"):
        eval_plots.write_eval_plots({"per_class": [{"name": "a", "category_id": 1, "AP": None}]},
                                    out_dir=str(tmp_path))


def test_without_matplotlib_says_how_to_install(evaluated, monkeypatch, tmp_path):
    out_dir, _, _ = evaluated
    monkeypatch.setattr(eval_plots, "_matplotlib", lambda: None)
    log = io.StringIO()
    assert eval_plots.write_eval_plots(str(out_dir / "eval.json"), out_dir=str(tmp_path), log=log) == []
    assert "pip install matplotlib" in log.getvalue()
    assert not os.listdir(tmp_path)


def test_tools_eval_writes_plots_next_to_eval_json(tiny_trained, tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import eval as eval_tool

    checkpoint, shapes = tiny_trained
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(load_file(checkpoint)["config"]))
    out = tmp_path / "eval"
    code = eval_tool.main(["--config", str(config), "--weights", checkpoint, "--output-dir", str(out),
                           "data.dataset=coco", f"data.val_images={shapes['images']}",
                           f"data.val_annotations={shapes['annotations']}", "data.num_workers=0", "train.device=cpu"])
    assert code == 0
    assert {"eval.json", "detections.json", eval_plots.AP_BARS_FILE, eval_plots.PR_CURVE_FILE} <= set(os.listdir(out))
    for name in (eval_plots.AP_BARS_FILE, eval_plots.PR_CURVE_FILE):
        _open_png(out / name)
