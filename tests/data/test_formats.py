"""YOLO labels and Pascal VOC XML, in small sets the tests write with known pixel boxes
(tests/support/label_formats.py): read directly (data.format, data.root) and scored by COCO
evaluation (ground truth fed back as detections gives AP 1.0)."""
import json
import os

import pytest

from detr_cuda.config import load_config
from detr_cuda.data import CocoDetection
from detr_cuda.data.build import build_dataset
from detr_cuda.data.coco import read_annotations
from detr_cuda.data.validate import AnnotationFileError, DatasetValidationError
from detr_cuda.data.voc import read_voc
from detr_cuda.data.yolo import read_yolo
from tests.support.label_formats import (NAMES, PICTURES, boxes_of, expected_boxes, ground_truth_ap, write_images,
                                         write_voc, write_yolo)


def test_yolo_read_directly_trains_as_its_coco_json_would(tmp_path):
    images, names = write_yolo(tmp_path / "yolo")
    coco_dict = read_yolo(images, names)
    assert coco_dict["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 2, "name": "bird"}]
    assert {(i["id"], i["file_name"], i["width"], i["height"]) for i in coco_dict["images"]} == {
        (7, "000007.png", 64, 48), (12, "000012.png", 50, 50), (20, "000020.png", 80, 60)}
    assert boxes_of(coco_dict) == expected_boxes(lambda c: c)
    assert ground_truth_ap(coco_dict) == pytest.approx(1.0)

    direct = CocoDetection(images, names, annotation_format="yolo")
    assert direct.categories.to_dict() == {"label_to_category_id": [0, 1, 2], "class_names": NAMES}
    assert direct.load_coco_gt().dataset["annotations"] == coco_dict["annotations"]
    output = tmp_path / "yolo_train.json"
    output.write_text(json.dumps(coco_dict))
    converted = CocoDetection(images, str(output))
    for index in range(len(direct)):
        assert converted[index][1]["boxes"].tolist() == direct[index][1]["boxes"].tolist()
        assert converted[index][1]["labels"].tolist() == direct[index][1]["labels"].tolist()


def test_yolo_darknet_layout_and_names_file(tmp_path):
    """Labels beside the images and a names file with one name per line."""
    write_images(tmp_path / "set")
    width, height, objects = PICTURES["000007.png"]
    (tmp_path / "set" / "000007.txt").write_text("".join(
        f"{c} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}\n" for c, (x, y, w, h) in objects))
    (tmp_path / "obj.names").write_text("cat\ndog\n\nbird\n")
    coco_dict = read_annotations(str(tmp_path / "obj.names"), str(tmp_path / "set"), "yolo")
    assert [c["name"] for c in coco_dict["categories"]] == NAMES
    assert len(coco_dict["annotations"]) == 2


def test_yolo_bad_labels_are_named(tmp_path):
    images, names = write_yolo(tmp_path / "yolo")
    label = tmp_path / "yolo" / "labels" / "train" / "000012.txt"
    label.write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(AnnotationFileError, match=r"000012\.txt:1: expected 'class cx cy w h'"):
        read_yolo(images, names)
    label.write_text("dog 0.5 0.5 0.2 0.2\n")
    with pytest.raises(AnnotationFileError, match=r"000012\.txt:1: expected numbers 'class cx cy w h', got 'dog"):
        read_yolo(images, names)
    label.write_text("7 0.5 0.5 0.2 0.2\n")  # a class the names do not have: validation names the file
    with pytest.raises(DatasetValidationError, match=r"file 000012\.png.*category id 7 is not in 'categories'"):
        CocoDetection(images, names, annotation_format="yolo")
    (tmp_path / "yolo" / "images" / "train" / "000020.png").write_bytes(b"broken")
    with pytest.raises(AnnotationFileError, match=r"cannot read the size of image .*000020\.png"):
        read_yolo(images, names)


def test_voc_read_directly(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    coco_dict = read_voc(str(root / "ImageSets" / "Main" / "train.txt"), str(root / "JPEGImages"))
    assert coco_dict["categories"] == [{"id": 1, "name": "bird"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "dog"}]
    category_of = {"bird": 1, "cat": 2, "dog": 3}
    assert boxes_of(coco_dict) == expected_boxes(lambda c: category_of[NAMES[c]])
    assert [a["iscrowd"] for a in coco_dict["annotations"]] == [0, 1, 0]             # the difficult bird
    assert {i["id"]: (i["width"], i["height"]) for i in coco_dict["images"]}[12] == (50, 50)  # no <size>: read
    assert ground_truth_ap(coco_dict) == pytest.approx(1.0)

    cfg = load_config(None, ["data.format=voc", f"data.root={root}", "data.check_images=full"])
    dataset = build_dataset(cfg, "train")
    assert dataset.class_names == ["bird", "cat", "dog"] and len(dataset) == 3
    assert int(dataset[0][1]["labels"].numel()) == 1   # the difficult object is not trained on


def test_data_root_fills_each_formats_layout(tmp_path):
    images, names = write_yolo(tmp_path / "yolo")
    os.rename(tmp_path / "yolo" / "images" / "train", tmp_path / "yolo" / "images" / "val")
    os.rename(tmp_path / "yolo" / "labels" / "train", tmp_path / "yolo" / "labels" / "val")
    cfg = load_config(None, ["data.format=yolo", f"data.root={tmp_path / 'yolo'}"])
    assert len(build_dataset(cfg, "val")) == 3
    with pytest.raises(FileNotFoundError, match=r"data.train_images \(from data.root\): .*images/train does not exist"):
        build_dataset(cfg, "train")
