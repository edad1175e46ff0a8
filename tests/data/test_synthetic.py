import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from detr_cuda.data import CocoDetection
from detr_cuda.data.synthetic import CATEGORIES, generate_synthetic_coco, main
from detr_cuda.data.validate import validate_coco_dict


def _digest(folder):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as handle:
                digest.update(name.encode() + handle.read())
    return digest.hexdigest()


def test_generator_is_deterministic_and_idempotent(tmp_path):
    first = generate_synthetic_coco(tmp_path / "a", num_images=12, image_size=96, seed=5)
    second = generate_synthetic_coco(tmp_path / "b", num_images=12, image_size=96, seed=5)
    assert first["generated"] and second["generated"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    mtime = os.path.getmtime(first["annotations"])
    again = generate_synthetic_coco(tmp_path / "a", num_images=12, image_size=96, seed=5)
    assert not again["generated"] and os.path.getmtime(first["annotations"]) == mtime
    other = generate_synthetic_coco(tmp_path / "a", num_images=12, image_size=96, seed=6)
    assert other["generated"] and _digest(tmp_path / "a") != _digest(tmp_path / "b")
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_generated_set_is_valid_coco_with_sparse_ids_and_empty_images(tmp_path):
    paths = generate_synthetic_coco(tmp_path / "syn", num_images=60, image_size=128, seed=0)
    with open(paths["annotations"]) as handle:
        coco_dict = json.load(handle)
    assert validate_coco_dict(coco_dict, paths["images"], check_images="full").ok
    dataset = CocoDetection(paths["images"], paths["annotations"])  # pycocotools index inside
    coco = dataset.load_coco_gt()
    assert sorted(coco.getCatIds()) == [3, 7, 12, 20]
    assert dataset.label_to_category_id == [3, 7, 12, 20] and dataset.num_classes == 4
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert 0 in per_image and max(per_image) >= 3
    used = {a["category_id"] for a in coco_dict["annotations"]}
    assert used == {3, 7, 12, 20}
    for a in coco_dict["annotations"]:
        image = coco.imgs[a["image_id"]]
        side = min(image["width"], image["height"])
        assert 0.1 * side <= max(a["bbox"][2:]) <= 0.6 * side


def test_objects_are_drawn_where_the_boxes_say(tmp_path):
    paths = generate_synthetic_coco(tmp_path / "syn", num_images=20, image_size=128, seed=2, image_format="png")
    with open(paths["annotations"]) as handle:
        coco_dict = json.load(handle)
    colours = {cid: np.array(rgb, dtype=np.float32) for cid, _, rgb in CATEGORIES}
    files = {i["id"]: i["file_name"] for i in coco_dict["images"]}
    for a in coco_dict["annotations"]:
        pixels = np.asarray(Image.open(os.path.join(paths["images"], files[a["image_id"]])), dtype=np.float32)
        x, y, w, h = a["bbox"]
        centre = pixels[y + h // 2 - 1:y + h // 2 + 2, x + w // 2 - 1:x + w // 2 + 2].reshape(-1, 3)
        # the box centre lies inside every shape; an object drawn later on top may cover it
        covered = [o for o in coco_dict["annotations"] if o["image_id"] == a["image_id"] and o["id"] > a["id"]]
        if not covered:
            assert np.abs(centre.mean(0) - colours[a["category_id"]]).max() < 40


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-images", "3", "--image-size", "64"])
    assert "generated" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cli" / "images")) == 3


@pytest.mark.parametrize("layout", ["yolo", "voc"])
def test_the_generated_set_in_yolo_and_voc_layouts_reads_back_the_same(layout, tmp_path):
    from detr_cuda.data.coco import read_annotations
    main(["--out", str(tmp_path / layout), "--layout", layout, "--split", "val", "--num-images", "5",
          "--image-size", "64"])
    with open(tmp_path / layout / "coco_val" / "annotations.json") as handle:
        original = json.load(handle)
    source = {"yolo": (tmp_path / "yolo" / "data.yaml", tmp_path / "yolo" / "images" / "val"),
              "voc": (tmp_path / "voc" / "ImageSets" / "Main" / "val.txt", tmp_path / "voc" / "JPEGImages")}[layout]
    again = read_annotations(str(source[0]), str(source[1]), layout)
    names = {c["id"]: c["name"] for c in original["categories"]}
    again_names = {c["id"]: c["name"] for c in again["categories"]}
    assert len(again["images"]) == 5 and len(again["annotations"]) == len(original["annotations"]) > 0
    for before, after in zip(original["annotations"], again["annotations"]):
        assert names[before["category_id"]] == again_names[after["category_id"]]
        assert after["bbox"] == pytest.approx(before["bbox"], abs=0.01)  # YOLO: 6-digit fractions
