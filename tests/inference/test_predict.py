"""tools/infer.py and detr_cuda.inference (Detector, image_files): files, folders and globs in; COCO results JSON
(with the dataset's category ids and names) and pictures out; unreadable files reported and skipped."""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.paths import REPO_ROOT, coco128_dir
from tests.support.configs import tiny_detector_config

from detr_cuda.config import config_to_dict
from detr_cuda.data.coco import load_instances_json
from detr_cuda.categories import COCO_CATEGORY_NAMES, CategoryMap
from detr_cuda.inference import Detector, list_images
from detr_cuda.models import build_model

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import infer as infer_tool  # noqa: E402


def check_results(results_path, allowed_names, image_ids=None):
    """results.json is a COCO results list whose categories are ``allowed_names`` {id: name}."""
    with open(results_path) as handle:
        results = json.load(handle)
    assert isinstance(results, list)
    for entry in results:
        assert set(entry) >= {"image_id", "category_id", "category_name", "bbox", "score", "file_name"}
        assert isinstance(entry["image_id"], int) and isinstance(entry["category_id"], int)
        assert entry["category_id"] in allowed_names, entry
        assert entry["category_name"] == allowed_names[entry["category_id"]]
        x, y, w, h = entry["bbox"]
        assert w >= 0 and h >= 0
        assert 0.0 <= entry["score"] <= 1.0
        if image_ids is not None:
            assert entry["image_id"] == image_ids[entry["file_name"]]
    return results


def test_infer_generated_images_and_unreadable_file(tiny_trained, tmp_path, capsys):
    checkpoint, shapes = tiny_trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    names = sorted(os.listdir(shapes["images"]))[:3]
    for name in names:
        Image.open(os.path.join(shapes["images"], name)).save(inputs / name)
    # A grayscale PNG of another size, and a file that is no image at all.
    Image.fromarray((np.arange(90 * 70) % 255).astype(np.uint8).reshape(90, 70), mode="L").save(inputs / "gray.png")
    (inputs / "broken.jpg").write_bytes(b"this is not a JPEG")
    out = tmp_path / "out"

    code = infer_tool.main(["--checkpoint", checkpoint, "--input", str(inputs), "--output-dir", str(out),
                            "--batch-size", "2", "--score-threshold", "0.0", "--device", "cpu"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"skipping unreadable image {inputs / 'broken.jpg'}" in err
    assert "4/5" in err or "5/5" in err  # progress lines

    categories = {c["id"]: c["name"] for c in load_instances_json(shapes["annotations"])["categories"]}
    results = check_results(out / "results.json", categories)
    assert {entry["file_name"] for entry in results} == set(names) | {"gray.png"}
    assert len(results) == 4 * 20  # top-20 (eval.num_select) per readable image, json threshold 0
    pictures = sorted(os.listdir(out / "images"))
    assert pictures == sorted(names + ["gray.png"])
    for name in names + ["gray.png"]:
        with Image.open(out / "images" / name) as picture:
            picture.load()
            with Image.open(inputs / name) as original:
                assert picture.size == original.size
            assert picture.format == ("PNG" if name.endswith(".png") else "JPEG")


def test_infer_only_unreadable_files_fails_cleanly(tiny_trained, tmp_path, capsys):
    checkpoint, _ = tiny_trained
    (tmp_path / "a.jpg").write_bytes(b"")
    code = infer_tool.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "*.jpg"),
                            "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 1
    assert "a.jpg" in capsys.readouterr().err
    with open(tmp_path / "out" / "results.json") as handle:
        assert json.load(handle) == []


def _save_untrained(path, num_classes, category_map=None, official=False):
    """A tiny untrained model saved like ours (config + category map) or like the official release."""
    cfg = tiny_detector_config()
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, num_classes)
    if official:
        torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=2e-4), "epoch": 49}, path)
    else:
        torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "category_map": category_map}, path)
    return cfg


def test_infer_coco128_with_dataset_category_ids(tmp_path):
    root = coco128_dir()
    annotations = os.path.join(root, "annotations.json")
    category_map = CategoryMap.from_annotations(annotations)
    checkpoint = str(tmp_path / "coco128_model.pth")
    _save_untrained(checkpoint, category_map.num_labels,
                    {"label_to_category_id": category_map.label_to_category_id,
                     "class_names": category_map.class_names})
    files = sorted(os.listdir(os.path.join(root, "images")))[:3]
    pattern = os.path.join(root, "images", "00000000000*.jpg")
    paths = list_images([pattern, os.path.join(root, "images", files[1]), os.path.join(root, "images", files[2])])
    out = tmp_path / "out"
    code = infer_tool.main(["--checkpoint", checkpoint, "--input", *paths, "--output-dir", str(out),
                            "--device", "cpu", "--no-draw", "--json-score-threshold", "0.0"])
    assert code == 0
    image_ids = {os.path.basename(p): int(os.path.splitext(os.path.basename(p))[0]) for p in paths}
    results = check_results(out / "results.json", category_map.category_names(), image_ids)
    # COCO file names carry the image id: results line up with the annotation file's ids.
    known = {image["id"] for image in load_instances_json(annotations)["images"]}
    assert {entry["image_id"] for entry in results} <= known
    assert len(results) == len(paths) * 20


def test_official_checkpoint_needs_config_and_maps_to_coco_ids(tmp_path):
    root = coco128_dir()
    checkpoint = str(tmp_path / "official.pth")
    cfg = _save_untrained(checkpoint, 91, official=True)
    with pytest.raises(ValueError, match="holds no config"):
        Detector.from_checkpoint(checkpoint, device="cpu")
    config_path = tmp_path / "tiny.yaml"
    import yaml
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    detector = Detector.from_checkpoint(checkpoint, str(config_path), device="cpu")
    assert detector.category_map.num_labels == 91
    image = os.path.join(root, "images", sorted(os.listdir(os.path.join(root, "images")))[0])
    out = tmp_path / "out"
    # An override right after --input's values is still an override, not an input file.
    code = infer_tool.main(["--checkpoint", checkpoint, "--config", str(config_path), "--input", image,
                            "eval.num_select=300", "--output-dir", str(out), "--device", "cpu"])
    assert code == 0
    # Label 0 and COCO's unused ids name no category and are dropped; all others keep their COCO id.
    results = check_results(out / "results.json", COCO_CATEGORY_NAMES)
    assert 100 < len(results) <= 300   # top-300 (the config says 20) minus the dropped labels


def test_a_checkpoint_without_a_category_map_needs_annotations(tmp_path):
    official = CategoryMap.official_coco()
    assert official.label_to_category_id[1] == 1 and official.class_names[1] == "person"
    assert official.label_to_category_id[0] is None and official.label_to_category_id[12] is None
    # A checkpoint with a 4-class head and no map cannot name its classes.
    checkpoint = str(tmp_path / "nomap.pth")
    _save_untrained(checkpoint, 4, category_map=None)
    with pytest.raises(ValueError, match="no category map"):
        Detector.from_checkpoint(checkpoint, device="cpu")


def test_list_images_inputs(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpeg").write_bytes(b"x")
    assert list_images(str(tmp_path)) == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert list_images(str(tmp_path / "**" / "*.jp*g")) == [str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "c.jpeg")]
    assert list_images([str(tmp_path / "notes.txt"), str(tmp_path / "notes.txt")]) == [str(tmp_path / "notes.txt")]
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_images(str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError, match="no image files"):
        list_images(str(tmp_path / "*.gif"))


def _copy_shapes(shapes, folder, count):
    folder.mkdir(parents=True)
    names = sorted(os.listdir(shapes["images"]))[:count]
    for name in names:
        Image.open(os.path.join(shapes["images"], name)).save(folder / name)
    return names


def test_infer_very_elongated_image_is_resized_not_a_crash(tiny_trained, tmp_path, capsys):
    # 4 x 2000 at val_max_size 128 used to give a short side of 0 and a raw PIL traceback
    checkpoint, shapes = tiny_trained
    inputs = tmp_path / "inputs"
    names = _copy_shapes(shapes, inputs, 2)
    Image.new("RGB", (4, 2000), (120, 30, 200)).save(inputs / "tall.png")
    out = tmp_path / "out"
    code = infer_tool.main(["--checkpoint", checkpoint, "--input", str(inputs), "--output-dir", str(out),
                            "--batch-size", "3", "--device", "cpu", "--no-draw"])
    assert code == 0, capsys.readouterr().err
    with open(out / "results.json") as handle:
        assert {entry["file_name"] for entry in json.load(handle)} == set(names) | {"tall.png"}


def test_infer_skips_an_image_that_fails_after_reading(tiny_trained, tmp_path, capsys, monkeypatch):
    checkpoint, shapes = tiny_trained
    inputs = tmp_path / "inputs"
    names = _copy_shapes(shapes, inputs, 3)
    real_preprocess = Detector.preprocess

    def preprocess_failing_on_the_second(self, image):
        if image.tobytes() == Image.open(inputs / names[1]).convert("RGB").tobytes():
            raise ValueError("height and width must be > 0")
        return real_preprocess(self, image)

    monkeypatch.setattr(Detector, "preprocess", preprocess_failing_on_the_second)
    out = tmp_path / "out"
    code = infer_tool.main(["--checkpoint", checkpoint, "--input", str(inputs), "--output-dir", str(out),
                            "--batch-size", "2", "--device", "cpu", "--no-draw"])
    err = capsys.readouterr().err
    assert code == 0
    assert f"{inputs / names[1]}: ValueError: height and width must be > 0" in err
    with open(out / "results.json") as handle:
        assert {entry["file_name"] for entry in json.load(handle)} == {names[0], names[2]}


def test_infer_file_names_tell_apart_same_names_in_two_folders(tiny_trained, tmp_path):
    checkpoint, shapes = tiny_trained
    name = _copy_shapes(shapes, tmp_path / "dupA", 1)[0]
    _copy_shapes(shapes, tmp_path / "dupB", 1)
    out = tmp_path / "out"
    code = infer_tool.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "dupA"), str(tmp_path / "dupB"),
                            "--output-dir", str(out), "--score-threshold", "0.0", "--device", "cpu"])
    assert code == 0
    with open(out / "results.json") as handle:
        results = json.load(handle)
    assert {entry["file_name"] for entry in results} == {os.path.join("dupA", name), os.path.join("dupB", name)}
    assert len({entry["image_id"] for entry in results}) == 2
    assert len(os.listdir(out / "images")) == 2  # picture names stay unique


def test_result_file_names_relative_to_the_common_folder():
    from detr_cuda.inference.image_files import result_file_names
    assert result_file_names(["photos/a.jpg", "photos/b.jpg"]) == {"photos/a.jpg": "a.jpg", "photos/b.jpg": "b.jpg"}
    assert result_file_names(["x/1.jpg", "x/y/1.jpg"]) == {"x/1.jpg": "1.jpg", "x/y/1.jpg": os.path.join("y", "1.jpg")}


def test_read_image_applies_the_exif_orientation(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) is
    read upright, as viewers show it; its top-left stored pixel ends up at the top right."""
    from detr_cuda.inference import read_image
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    upright = read_image(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((19, 0)) == (255, 0, 0)


def test_infer_ids_come_from_the_readable_files_names(tiny_trained, tmp_path, capsys):
    """A stray unreadable file (not named by a number) used to renumber every image 1..N."""
    checkpoint, shapes = tiny_trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for number, name in zip((9, 25), sorted(os.listdir(shapes["images"]))):
        Image.open(os.path.join(shapes["images"], name)).save(inputs / f"{number:012d}.jpg")
    (inputs / "Thumbs.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert infer_tool.main(["--checkpoint", checkpoint, "--input", str(inputs), "--output-dir", str(out),
                            "--device", "cpu", "--no-draw"]) == 0
    assert "skipping unreadable image" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert {(r["file_name"], r["image_id"]) for r in results} == {("000000000009.jpg", 9), ("000000000025.jpg", 25)}


def test_infer_says_why_a_picture_is_empty(tiny_trained, tmp_path, capsys):
    checkpoint, shapes = tiny_trained
    names = _copy_shapes(shapes, tmp_path / "inputs", 2)
    out = tmp_path / "out"
    assert infer_tool.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "inputs"), "--output-dir", str(out),
                            "--device", "cpu", "--score-threshold", "0.999"]) == 0
    err = capsys.readouterr().err
    assert "0 detection(s) scored >= 0.999" in err
    best = {r["file_name"]: r["score"] for r in sorted(json.loads((out / "results.json").read_text()),
                                                       key=lambda r: r["score"])}
    assert f"2 image(s) with no detection >= 0.999; their best scores: {names[0]} {best[names[0]]:.3f}, " \
           f"{names[1]} {best[names[1]]:.3f}" in err
    assert infer_tool.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "inputs"), "--output-dir", str(out),
                            "--device", "cpu", "--score-threshold", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{2 * 20} detection(s) scored >= 0" in err and "no detection" not in err
