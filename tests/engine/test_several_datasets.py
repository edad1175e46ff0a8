"""Several data sets: concatenated for training with one category map merged by name (stored in the
checkpoint), each validation set scored against its own file's category ids, a report per set."""
import json
import os
import sys

import pytest
import torch

from detr_cuda.categories import CategoryMap
from detr_cuda.config import load_config
from detr_cuda.data import build_dataloader
from detr_cuda.data.build import build_dataset
from detr_cuda.engine.evaluate import evaluate, scalar_metrics
from detr_cuda.models.postprocess import PostProcess
from tests.support.configs import RUN_TINY
from tests.support.launch import BASE_CONFIG, EVAL, TRAIN, explain, read_log, run


def write_set(folder, categories, boxes_per_image, size=64):
    """A COCO set of size x size images; boxes_per_image: per image [(category id, [x, y, w, h])]."""
    from PIL import Image
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        image = Image.new("RGB", (size, size), (100, 100, 100))
        for category_id, (x, y, w, h) in boxes:
            image.paste((40 * category_id % 255, 200, 30), (x, y, x + w, y + h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        image.save(folder / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size, "height": size})
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": categories}))
    return str(folder / "images"), str(folder / "ann.json")


# Overlapping ("dog") and disjoint names; "dog" has id 2 in one file and 7 in the other, and the
# second file's "bird" has id 1, which is the first file's "cat".
FIRST = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
SECOND = [{"id": 7, "name": "Dog"}, {"id": 1, "name": "bird"}]
FIRST_BOXES = [[(1, [4, 4, 20, 20]), (2, [30, 30, 25, 20])], [(2, [10, 12, 30, 30])]]
SECOND_BOXES = [[(7, [5, 5, 30, 30])], [(1, [20, 8, 24, 40]), (7, [2, 40, 20, 20])], []]


@pytest.fixture
def two_sets(tmp_path):
    return write_set(tmp_path / "first", FIRST, FIRST_BOXES), write_set(tmp_path / "second", SECOND, SECOND_BOXES)


def config_for(two_sets, *overrides):
    (first_images, first_ann), (second_images, second_ann) = two_sets
    return load_config(None, [
        f"data.train_images=[{first_images}, {second_images}]", f"data.train_annotations=[{first_ann}, {second_ann}]",
        f"data.val_images=[{first_images}, {second_images}]", f"data.val_annotations=[{first_ann}, {second_ann}]",
        "data.val_short_side=64", "data.val_max_size=64", *overrides])


def test_concatenation_merges_categories_by_name(two_sets):
    train = build_dataset(config_for(two_sets, "data.random_crop=false", "data.horizontal_flip=false",
                                     "data.train_short_sides=[64]", "data.train_max_size=64"), "train")
    assert train.categories == CategoryMap([1, 2, 8], ["cat", "dog", "bird"])  # bird: id 1 is taken, 1 + the top id
    assert len(train) == 5
    labels = [train[(index, 123)][1]["labels"].tolist() for index in range(5)]   # the sampler's (index, seed) keys
    assert labels == [[0, 1], [1], [1], [2, 1], []]
    assert [train[index][1]["dataset_index"] for index in range(5)] == [0, 0, 1, 1, 1]
    assert [int(train[index][1]["image_id"]) for index in range(5)] == [1, 2, 1, 2, 3]  # each file's own ids
    assert "bird(8) in sets 1" in train.summary() and "dog(2) in sets 0,1" in train.summary()


class GroundTruthModel(torch.nn.Module):
    """Answers each batch with its ground truth (score ~1 for the target's label, boxes as given):
    a perfect detector, so every data set scores AP 1.0 exactly when labels reach each set's own ids."""

    def __init__(self, num_classes, num_queries=6):
        super().__init__()
        self.num_classes, self.num_queries, self.targets = num_classes, num_queries, None

    def forward(self, images, masks):
        logits = torch.full((len(self.targets), self.num_queries, self.num_classes), -20.0)
        boxes = torch.full((len(self.targets), self.num_queries, 4), 0.5)
        for b, target in enumerate(self.targets):
            known = target["labels"] < self.num_classes   # a class the model lacks is never found
            count = int(known.sum())
            logits[b, torch.arange(count), target["labels"][known]] = 20.0
            boxes[b, :count] = target["boxes"][known]
        return {"pred_logits": logits, "pred_boxes": boxes}


class FeedingLoader:
    """A loader that hands each batch's targets to the model before evaluate() runs it."""

    def __init__(self, loader, model):
        self.loader, self.model = loader, model

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, masks, targets in self.loader:
            self.model.targets = targets
            yield images, masks, targets


def test_each_validation_set_is_scored_in_its_own_category_ids(two_sets, tmp_path):
    cfg = config_for(two_sets)
    val = build_dataset(cfg, "val")
    model = GroundTruthModel(val.num_classes)
    loader = FeedingLoader(build_dataloader(val, batch_size=2, train=False), model)
    lines = []
    result = evaluate(model, PostProcess(), loader, val, torch.device("cpu"), cfg, str(tmp_path / "out"),
                      log=lines.append, categories=val.categories)
    assert [part["metrics"]["AP"] for part in result["datasets"]] == [pytest.approx(1.0)] * 2
    assert result["metrics"]["AP"] == pytest.approx(1.0)
    second = json.loads((tmp_path / "out" / "val1" / "eval.json").read_text())
    assert {(row["category_id"], row["name"], row["num_gt"]) for row in second["per_class"]} == {
        (7, "Dog", 2), (1, "bird", 1)}
    assert {d["category_id"] for d in json.loads((tmp_path / "out" / "val1" / "detections.json").read_text())} == {1, 7}
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["datasets"][1]["annotations"] == two_sets[1][1]
    assert any(line.startswith("validation set 1: ") for line in lines)
    assert scalar_metrics(result)["val1_AP"] == pytest.approx(1.0)

    # A model that knows only "cat" and "dog": the second set's birds are misses, named in the log.
    lines.clear()
    small = CategoryMap([1, 2], ["cat", "dog"])
    model = GroundTruthModel(small.num_labels)
    result = evaluate(model, PostProcess(), FeedingLoader(build_dataloader(val, 2, train=False), model),
                      val, torch.device("cpu"), cfg, None, log=lines.append, categories=small)
    assert result["datasets"][0]["metrics"]["AP"] == pytest.approx(1.0)
    assert result["datasets"][1]["metrics"]["AP"] == pytest.approx(0.5)   # dog found, bird never
    assert any("1 category the model was not trained on (scored as misses): ['bird (id 1)']" in line for line in lines)


def test_training_on_two_sets_from_a_config_in_another_folder(two_sets, tmp_path):
    """tools/train.py with a config file whose relative paths point at two data sets, run from an
    unrelated folder: the merged map goes into the checkpoint, each set gets its own report, and the
    eval records name the epoch that was trained."""
    (first_images, first_ann), (second_images, second_ann) = two_sets
    relative = lambda path: os.path.relpath(path, tmp_path / "configs")  # noqa: E731
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "two.yaml").write_text(
        f"_base_: {BASE_CONFIG}\ndata:\n  dataset: coco\n"
        f"  train_images: [{relative(first_images)}, {relative(second_images)}]\n"
        f"  train_annotations: [{relative(first_ann)}, {relative(second_ann)}]\n"
        f"  val_images: [{relative(first_images)}, {relative(second_images)}]\n"
        f"  val_annotations: [{relative(first_ann)}, {relative(second_ann)}]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    overrides = [o for o in RUN_TINY if not o.startswith("data.dataset=")]
    result = run([sys.executable, TRAIN, "--config", "../configs/two.yaml", *overrides, "train.output_dir=run",
                  "train.epochs=2", "train.eval_every=1", "train.batch_size=3", "eval.batch_size=2"],
                 cwd=str(elsewhere))
    assert result.returncode == 0, explain(result)
    output = elsewhere / "run"
    checkpoint = torch.load(output / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["category_map"] == {"label_to_category_id": [1, 2, 8], "class_names": ["cat", "dog", "bird"]}
    assert (output / "val0" / "eval.json").is_file() and (output / "val1" / "detections.json").is_file()
    assert "validation set 1: " in result.stdout and "mean over 2 validation sets" in result.stdout
    evals, epochs = read_log(output, "eval"), read_log(output, "epoch")
    assert [r["epoch"] for r in evals] == [r["epoch"] for r in epochs] == [0, 1]
    assert {"val0_AP", "val1_AP"} <= set(evals[-1])

    # tools/eval.py from the saved config (its paths are absolute): each set against its own file
    evaluated = run([sys.executable, EVAL, "--config", str(output / "config.yaml"), "--weights",
                     str(output / "checkpoint_last.pth"), "--output-dir", str(tmp_path / "eval"), "--no-plots"])
    assert evaluated.returncode == 0, explain(evaluated)
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [part["annotations"] for part in summary["datasets"]] == [first_ann, second_ann]
    assert {row["category_id"] for row in summary["datasets"][1]["per_class"]} == {1, 7}
