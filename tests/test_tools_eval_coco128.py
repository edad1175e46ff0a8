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
