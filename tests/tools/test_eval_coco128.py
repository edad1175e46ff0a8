"""A short real training run on a few coco128 images writes a valid eval.json; tools/eval.py reads it back."""
import json
import sys

from tests.support.paths import coco128_dir
from tests.support.configs import RUN_TINY
from tests.support.launch import EVAL, BASE_CONFIG, explain, run, train


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
    args = ["--config", BASE_CONFIG, *RUN_TINY, *data, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
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

    evaluated = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *data,
                     "--weights", str(tmp_path / "run" / "checkpoint_last.pth"),
                     "--output-dir", str(tmp_path / "eval")], timeout=240)
    assert evaluated.returncode == 0, explain(evaluated)
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["coco_stats"] == metrics["coco_stats"]  # same weights, same numbers
    assert "Average Precision" in evaluated.stdout and "category" in evaluated.stdout
    # One image per batch: progress lines with an ETA before the table.
    stepwise = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *data, "eval.batch_size=1", "--no-plots",
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

    config = load_config(BASE_CONFIG, [*RUN_TINY, "model.num_classes=91"])
    model, _, _ = build_model(config, None)
    torch.save({"model": model.state_dict(), "epoch": 49, "args": argparse.Namespace(lr=2e-4)},
               tmp_path / "official_like.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.val_short_side=96", "data.val_max_size=128"]
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *data,
                  "--weights", str(tmp_path / "official_like.pth"), "--output-dir", str(tmp_path / "eval")],
                 timeout=240)
    assert result.returncode == 0, explain(result)
    assert "class rows matched by category name (91 rows in the file)" in result.stdout
    assert (tmp_path / "eval" / "eval.json").exists()


def test_eval_refuses_a_checkpoint_whose_classes_the_dataset_does_not_match(tmp_path):
    """A 3-class checkpoint (ids 1, 2, 3) on 80-class coco128: untrained rows would score 77 classes."""
    import torch

    from detr_cuda.config import load_config
    from detr_cuda.checkpoint import FORMAT
    from detr_cuda.models import build_model

    config = load_config(BASE_CONFIG, RUN_TINY)
    model, _, _ = build_model(config, 3)
    torch.save({"format": FORMAT, "model": model.state_dict(), "epoch": 0,
                "category_map": {"label_to_category_id": [1, 2, 3], "class_names": ["person", "bicycle", "car"]}},
               tmp_path / "three_class.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.val_short_side=96", "data.val_max_size=128"]
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *data, "--no-plots",
                  "--weights", str(tmp_path / "three_class.pth"), "--output-dir", str(tmp_path / "eval")],
                 timeout=240)
    assert result.returncode == 2, explain(result)
    assert "77 categories with no trained class row" in result.stderr and "bicycle" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_eval_refuses_weights_that_do_not_fit_the_config(tmp_path):
    """Weights of another architecture (here hidden 64, the config says 32): exit 2 naming the tensors,
    not an AP of 0.0 from a half-loaded model."""
    import torch

    from detr_cuda.checkpoint import FORMAT
    from detr_cuda.config import config_to_dict, load_config
    from detr_cuda.models import build_model

    config = load_config(BASE_CONFIG, [*RUN_TINY, "model.hidden_dim=64"])
    model, _, _ = build_model(config, 80)
    from detr_cuda.categories import CategoryMap
    categories = CategoryMap.from_annotations(f"{coco128_dir()}/annotations.json")
    torch.save({"format": FORMAT, "model": model.state_dict(), "config": config_to_dict(config),
                "category_map": categories.to_dict()}, tmp_path / "wide.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.val_short_side=96", "data.val_max_size=128"]
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *data, "--no-plots",
                  "--weights", str(tmp_path / "wide.pth"), "--output-dir", str(tmp_path / "eval")], timeout=240)
    assert result.returncode == 2, explain(result)
    assert "of another shape in the file" in result.stderr and "transformer.level_embed" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "eval" / "eval.json").exists()


def test_an_official_layout_dn_checkpoint_evaluates_on_80_categories(tmp_path):
    """DN-DETR's release: 91-row heads and a 92-row label book indexed by COCO id, no category map. Its
    rows are picked by category; the label book (unused at evaluation) does not block."""
    import argparse

    import torch

    from detr_cuda.config import load_config
    from detr_cuda.models import build_model

    dn = ["model.query_type=anchor", "model.with_box_refine=true", "dn.enabled=true"]
    config = load_config(BASE_CONFIG, [*RUN_TINY, *dn, "model.num_classes=91"])
    model, _, _ = build_model(config, None)
    assert model.label_enc.weight.shape[0] == 92
    torch.save({"model": model.state_dict(), "epoch": 49, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "dn_official.pth")
    data = ["data.dataset=coco", *_subset(tmp_path), "data.val_short_side=96", "data.val_max_size=128"]
    result = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *dn, *data, "--no-plots",
                  "--weights", str(tmp_path / "dn_official.pth"), "--output-dir", str(tmp_path / "eval")], timeout=240)
    assert result.returncode == 0, explain(result)
    assert "class rows matched by category name (91 rows in the file)" in result.stdout
    assert (tmp_path / "eval" / "eval.json").exists()
    # Keeping the whole 91-row head (model.num_classes=91) evaluates too: rows are COCO ids there.
    whole = run([sys.executable, EVAL, "--config", BASE_CONFIG, *RUN_TINY, *dn, *data, "model.num_classes=91",
                 "--no-plots", "--weights", str(tmp_path / "dn_official.pth"), "--output-dir", str(tmp_path / "e91")],
                timeout=240)
    assert whole.returncode == 0, explain(whole)
    assert json.loads((tmp_path / "e91" / "eval.json").read_text())["coco_stats"] == \
        json.loads((tmp_path / "eval" / "eval.json").read_text())["coco_stats"]
