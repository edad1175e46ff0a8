"""tools/convert_dataset.py: COCO JSON from YOLO labels and Pascal VOC XML written by the test; the
JSON equals what training reads directly; bad input is one line naming the file, exit 2."""
import json
import os
import sys

import pytest

from detr_cuda.data.voc import read_voc
from detr_cuda.data.yolo import read_yolo
from tests.support.label_formats import NAMES, boxes_of, expected_boxes, ground_truth_ap, write_voc, write_yolo
from tests.support.paths import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import convert_dataset as convert_tool  # noqa: E402


def test_yolo_to_coco_json(tmp_path):
    images, names = write_yolo(tmp_path / "yolo")
    output = tmp_path / "yolo_train.json"
    assert convert_tool.main(["yolo", "--images", images, "--names", names, "--output", str(output)]) == 0
    coco_dict = json.loads(output.read_text())
    assert coco_dict == read_yolo(images, names)
    assert boxes_of(coco_dict) == expected_boxes(lambda c: c)
    assert ground_truth_ap(coco_dict) == pytest.approx(1.0)


def test_voc_to_coco_json_with_a_class_order(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    output = tmp_path / "voc.json"
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    assert convert_tool.main(["voc", "--annotations", str(root / "Annotations"), "--names", str(tmp_path / "names.txt"),
                              "--output", str(output)]) == 0  # images found as JPEGImages beside Annotations
    ordered = json.loads(output.read_text())
    assert [c["name"] for c in ordered["categories"]] == NAMES
    assert boxes_of(ordered) == expected_boxes(lambda c: c + 1)
    assert ground_truth_ap(ordered) == pytest.approx(1.0)
    default = tmp_path / "default.json"  # names found, sorted; images found beside the split list's Annotations
    assert convert_tool.main(["voc", "--annotations", str(root / "ImageSets" / "Main" / "train.txt"),
                              "--output", str(default)]) == 0
    assert json.loads(default.read_text()) == read_voc(str(root / "Annotations"), str(root / "JPEGImages"))


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    images, names = write_yolo(tmp_path / "yolo")
    label = tmp_path / "yolo" / "labels" / "train" / "000012.txt"
    label.write_text("dog 0.5 0.5 0.2 0.2\n")
    assert convert_tool.main(["yolo", "--images", images, "--names", names, "--output", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {label}:1: expected numbers 'class cx cy w h', got 'dog 0.5 0.5 0.2 0.2'"]
    assert not (tmp_path / "x.json").exists()
    assert convert_tool.main(["voc", "--annotations", str(tmp_path / "nothing"), "--output", str(tmp_path / "y.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: VOC annotations not found: {tmp_path / 'nothing'}")
