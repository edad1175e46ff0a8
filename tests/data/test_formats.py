"""YOLO labels and Pascal VOC XML, in small sets this test writes with known pixel boxes: read
directly (data.format), converted to COCO JSON by tools/convert_dataset.py, and scored by COCO
evaluation (ground truth fed back as detections gives AP 1.0)."""
import copy
import json
import os
import sys

import pytest
from PIL import Image

from detr_cuda.config import load_config
from detr_cuda.data import CocoDetection
from detr_cuda.data.build import build_dataset
from detr_cuda.data.coco import coco_from_dict, read_annotations
from detr_cuda.data.coco_eval import evaluate_coco
from detr_cuda.data.validate import AnnotationFileError, DatasetValidationError
from detr_cuda.data.voc import read_voc
from detr_cuda.data.yolo import read_yolo
from tests.support.paths import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import convert_dataset as convert_tool  # noqa: E402

NAMES = ["cat", "dog", "bird"]
# file name -> (width, height, [(class index, [x, y, w, h] pixels)])
PICTURES = {
    "000007.png": (64, 48, [(0, [4, 6, 20, 10]), (2, [30, 20, 30, 28])]),
    "000012.png": (50, 50, [(1, [0, 0, 50, 25])]),
    "000020.png": (80, 60, []),                      # no label file: no objects
}


def write_images(folder):
    folder.mkdir(parents=True)
    for name, (width, height, _) in PICTURES.items():
        Image.new("RGB", (width, height), (90, 120, 150)).save(folder / name)


def write_yolo(root):
    """root/images/train, root/labels/train (one box as a polygon), root/data.yaml."""
    write_images(root / "images" / "train")
    (root / "labels" / "train").mkdir(parents=True)
    for name, (width, height, objects) in PICTURES.items():
        if not objects:
            continue
        lines = []
        for number, (class_index, (x, y, w, h)) in enumerate(objects):
            if number == 1:  # a segmentation polygon (a triangle spanning the box)
                lines.append(f"{class_index} {x / width} {y / height} {(x + w) / width} {(y + h / 2) / height} "
                             f"{(x + w / 3) / width} {(y + h) / height}")
            else:
                lines.append(f"{class_index} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}")
        (root / "labels" / "train" / name.replace(".png", ".txt")).write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    return str(root / "images" / "train"), str(root / "data.yaml")


def write_voc(root):
    """VOC2007-style: Annotations/*.xml (1-based inclusive pixels; one difficult object, one file without
    <size>), JPEGImages/, ImageSets/Main/train.txt."""
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for number, (name, (width, height, objects)) in enumerate(PICTURES.items()):
        size = "" if number == 1 else f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        xml_objects = "".join(
            f"<object><name>{NAMES[c]}</name><difficult>{int(number == 0 and k == 1)}</difficult><bndbox>"
            f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
            for k, (c, (x, y, w, h)) in enumerate(objects))
        (root / "Annotations" / name.replace(".png", ".xml")).write_text(
            f"<annotation><filename>{name}</filename>{size}{xml_objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(n.replace(".png", "\n") for n in PICTURES))
    return root


def expected_boxes(category_id_of):
    """{(image id, category id, (x, y, w, h))} of PICTURES."""
    return {(int(name[:6]), category_id_of(c), tuple(map(float, box)))
            for name, (_, _, objects) in PICTURES.items() for c, box in objects}


def boxes_of(coco_dict):
    """The annotations as expected_boxes gives them, pixel values rounded to 1e-4 (YOLO's fractions)."""
    return {(a["image_id"], a["category_id"], tuple(round(v, 4) + 0.0 for v in a["bbox"]))
            for a in coco_dict["annotations"]}


def ground_truth_ap(coco_dict):
    """AP of the ground truth fed back as detections (crowd / difficult regions left out)."""
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco_dict["annotations"] if not a.get("iscrowd")]
    return evaluate_coco(coco_from_dict(copy.deepcopy(coco_dict)), results, [i["id"] for i in coco_dict["images"]])["metrics"]["AP"]


def test_yolo_read_directly_and_converted(tmp_path):
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
    assert convert_tool.main(["yolo", "--images", images, "--names", names, "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == coco_dict
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


def test_yolo_bad_labels_are_named(tmp_path, capsys):
    images, names = write_yolo(tmp_path / "yolo")
    label = tmp_path / "yolo" / "labels" / "train" / "000012.txt"
    label.write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(AnnotationFileError, match=r"000012\.txt:1: expected 'class cx cy w h'"):
        read_yolo(images, names)
    label.write_text("dog 0.5 0.5 0.2 0.2\n")
    assert convert_tool.main(["yolo", "--images", images, "--names", names, "--output", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {label}:1: expected numbers 'class cx cy w h', got 'dog 0.5 0.5 0.2 0.2'"]
    label.write_text("7 0.5 0.5 0.2 0.2\n")  # a class the names do not have: validation names the file
    with pytest.raises(DatasetValidationError, match=r"file 000012\.png.*category id 7 is not in 'categories'"):
        CocoDetection(images, names, annotation_format="yolo")
    (tmp_path / "yolo" / "images" / "train" / "000020.png").write_bytes(b"broken")
    with pytest.raises(AnnotationFileError, match=r"cannot read the size of image .*000020\.png"):
        read_yolo(images, names)


def test_voc_read_directly_and_converted(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    coco_dict = read_voc(str(root / "ImageSets" / "Main" / "train.txt"), str(root / "JPEGImages"))
    assert coco_dict["categories"] == [{"id": 1, "name": "bird"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "dog"}]
    category_of = {"bird": 1, "cat": 2, "dog": 3}
    assert boxes_of(coco_dict) == expected_boxes(lambda c: category_of[NAMES[c]])
    assert [a["iscrowd"] for a in coco_dict["annotations"]] == [0, 1, 0]             # the difficult bird
    assert {i["id"]: (i["width"], i["height"]) for i in coco_dict["images"]}[12] == (50, 50)  # no <size>: read
    assert ground_truth_ap(coco_dict) == pytest.approx(1.0)

    output = tmp_path / "voc.json"
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    assert convert_tool.main(["voc", "--annotations", str(root / "Annotations"), "--names", str(tmp_path / "names.txt"),
                              "--output", str(output)]) == 0  # images found as JPEGImages beside Annotations
    ordered = json.loads(output.read_text())
    assert [c["name"] for c in ordered["categories"]] == NAMES
    assert boxes_of(ordered) == expected_boxes(lambda c: c + 1)

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
