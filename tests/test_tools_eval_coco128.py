"""A short real training run on a few coco128 images writes a valid eval.json; tools/eval.py reads it back."""
import json
import sys

from data_paths import coco128_dir
from train_helpers import EVAL, TINY, BASE_CONFIG, explain, run, train


def _subset(tmp_path, count=4):
    root = coco128_dir()
    with open(f"{root}/annotations.json") as handle:
        coco = json.load(handle)
    images = coco["images"][:count]
    ids = {image["id"] for image in images}
    subset = dict(coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    path = tmp_path / "coco128_subset.json"
    path.write_text(json.dumps(subset))
    return [f"data.train_images={root}/images", f"data.train_annotations={path}",
            f"data.val_images={root}/images", f"data.val_annotations={path}"]


def test_short_coco128_training_writes_a_valid_eval_json(tmp_path):
    data = ["data.dataset=coco", *_subset(tmp_path), "data.train_short_sides=[96]", "data.train_max_size=128",
            "data.val_short_side=96", "data.val_max_size=128"]
    args = ["--config", BASE_CONFIG, *TINY, *data, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
            "train.eval_every=0"]
    result = train(args)
    assert result.returncode == 0, explain(result)
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert metrics["num_images"] == 4
    assert len(metrics["coco_stats"]) == 12 and 0.0 <= metrics["metrics"]["AP"] <= 1.0
    assert {row["category_id"] for row in metrics["per_class"]} >= {1}  # COCO's own ids, not labels
    detections = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "eval" for r in records)

    evaluated = run([sys.executable, EVAL, "--config", BASE_CONFIG, *TINY, *data,
                     "--weights", str(tmp_path / "run" / "checkpoint_last.pth"),
                     "--output-dir", str(tmp_path / "eval")], timeout=240)
    assert evaluated.returncode == 0, explain(evaluated)
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["coco_stats"] == metrics["coco_stats"]  # same weights, same numbers
    assert "Average Precision" in evaluated.stdout and "category" in evaluated.stdout
    # One image per batch: progress lines with an ETA before the table.
    stepwise = run([sys.executable, EVAL, "--config", BASE_CONFIG, *TINY, *data, "eval.batch_size=1", "--no-plots",
                    "--weights", str(tmp_path / "run" / "checkpoint_last.pth"),
                    "--output-dir", str(tmp_path / "eval1")], timeout=240)
    assert stepwise.returncode == 0, explain(stepwise)
    assert "evaluation [1/4]" in stepwise.stdout and "evaluation [3/4]" in stepwise.stdout and "eta" in stepwise.stdout


def test_eval_accepts_an_official_style_91_class_checkpoint(tmp_path):
    """A file laid out like the official release (91 logits indexed by COCO id, a pickled Namespace)."""
    import argparse

    import torch

    from detr_cuda.config import load_config
    from detr_cuda.models import build_model

    config = load_config(BASE_CONFIG, [*TINY, "model.num_classes=91"])
    model, _, _ = build_model(config, None)
    torch.save({"model": model.state_dict(), "epoch": 49, "args": argparse.Namespace(lr=2e-4)},
               tmp_path / "official_like.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.val_short_side=96", "data.val_max_size=128"]
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *TINY, *data,
                  "--weights", str(tmp_path / "official_like.pth"), "--output-dir", str(tmp_path / "eval")],
                 timeout=240)
    assert result.returncode == 0, explain(result)
    assert "class heads mapped by category id onto this dataset's 80 classes" in result.stdout
    assert (tmp_path / "eval" / "eval.json").exists()


def test_eval_refuses_a_checkpoint_whose_classes_the_dataset_does_not_match(tmp_path):
    """A 3-class checkpoint (ids 1, 2, 3) on 80-class coco128: untrained rows would score 77 classes."""
    import torch

    from detr_cuda.config import load_config
    from detr_cuda.engine.checkpoint import FORMAT
    from detr_cuda.models import build_model

    config = load_config(BASE_CONFIG, TINY)
    model, _, _ = build_model(config, 3)
    torch.save({"format": FORMAT, "model": model.state_dict(), "epoch": 0,
                "category_map": {"label_to_category_id": [1, 2, 3], "class_names": ["person", "bicycle", "car"]}},
               tmp_path / "three_class.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.val_short_side=96", "data.val_max_size=128"]
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *TINY, *data, "--no-plots",
                  "--weights", str(tmp_path / "three_class.pth"), "--output-dir", str(tmp_path / "eval")],
                 timeout=240)
    assert result.returncode == 2, explain(result)
    assert "3-class head" in result.stderr and "80 classes" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "eval" / "eval.json").exists()
