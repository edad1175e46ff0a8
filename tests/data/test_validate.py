import json
import logging
import os

import pytest

from tests.support.paths import coco128_dir
from detr_cuda.config import load_config
from detr_cuda.data import CocoDetection, DatasetValidationError, build_dataset
from detr_cuda.data.validate import check_image_file, validate_coco_dict


@pytest.fixture(scope="module")
def corrupted_coco128(tmp_path_factory):
    """coco128 with: a missing file, a truncated JPEG, a zero-size box, an unknown category id,
    an annotation of an image that does not exist. Returns (image dir, json path, what was broken)."""
    root = coco128_dir()
    with open(os.path.join(root, "annotations.json")) as handle:
        coco = json.load(handle)
    out = tmp_path_factory.mktemp("corrupted")
    image_dir = out / "images"
    image_dir.mkdir()
    images = coco["images"]
    missing, truncated = images[3]["file_name"], images[7]["file_name"]
    for image in images:  # links keep the copy cheap; the two broken files are real files
        if image["file_name"] == truncated:
            with open(os.path.join(root, "images", truncated), "rb") as handle:
                data = handle.read()
            (image_dir / truncated).write_bytes(data[: len(data) // 2])
        elif image["file_name"] != missing:
            os.symlink(os.path.join(root, "images", image["file_name"]), image_dir / image["file_name"])
    broken_ids = {image["id"] for image in (images[3], images[7])}
    intact = [a for a in coco["annotations"] if a["image_id"] not in broken_ids and not a["iscrowd"]]
    zero_size, unknown_category, orphan = intact[0], intact[5], intact[9]
    zero_size["bbox"][2] = 0.0
    unknown_category["category_id"] = 999
    orphan["image_id"] = 123456789
    with open(out / "annotations.json", "w") as handle:
        json.dump(coco, handle)
    file_of = {image["id"]: image["file_name"] for image in images}
    broken = {"missing": missing, "truncated": truncated, "zero_size": zero_size["id"],
              "zero_size_file": file_of[zero_size["image_id"]], "unknown_category": unknown_category["id"],
              "unknown_category_file": file_of[unknown_category["image_id"]], "orphan": orphan["id"],
              "broken_image_ids": broken_ids,
              "annotations_of_broken_images": sum(a["image_id"] in broken_ids for a in coco["annotations"])}
    return str(image_dir), str(out / "annotations.json"), broken


def test_real_coco128_passes_validation():
    root = coco128_dir()
    with open(os.path.join(root, "annotations.json")) as handle:
        report = validate_coco_dict(json.load(handle), os.path.join(root, "images"))
    assert report.ok, report.format()


def test_fail_policy_names_every_problem(corrupted_coco128):
    image_dir, annotation_file, broken = corrupted_coco128
    with pytest.raises(DatasetValidationError) as error:
        CocoDetection(image_dir, annotation_file, invalid_annotations="fail")
    message = str(error.value)
    lines = message.splitlines()

    def line_with(*parts):
        found = [line for line in lines if all(part in line for part in parts)]
        assert found, f"no line with {parts} in:\n{message}"
        return found[0]

    line_with("[missing_image_file]", f"file {broken['missing']}")
    line_with("[truncated_image]", f"file {broken['truncated']}")
    line_with("[bad_box]", f"file {broken['zero_size_file']}", f"annotation_id {broken['zero_size']}",
              "non-positive size")
    line_with("[unknown_category]", f"file {broken['unknown_category_file']}",
              f"annotation_id {broken['unknown_category']}", "999")
    line_with("[unknown_image]", f"annotation_id {broken['orphan']}", "123456789")
    assert "5 problem(s)" in lines[0] and "invalid_annotations=skip" in message


def test_skip_policy_drops_bad_entries_and_logs_the_count(corrupted_coco128, caplog):
    image_dir, annotation_file, broken = corrupted_coco128
    with caplog.at_level(logging.WARNING, logger="detr_cuda.data.validate"):
        dataset = CocoDetection(image_dir, annotation_file, invalid_annotations="skip")
    dropped_annotations = broken["annotations_of_broken_images"] + 3
    assert f"skipping 2 image(s) and {dropped_annotations} annotation(s)" in caplog.text
    assert str(broken["zero_size"]) in caplog.text and broken["truncated"] in caplog.text
    assert len(dataset) == 126 and not set(dataset.image_ids.tolist()) & broken["broken_image_ids"]
    for index in range(0, len(dataset), 25):  # every remaining image loads
        dataset[index]
    coco_gt = dataset.load_coco_gt()  # the evaluation ground truth drops the same entries
    assert len(coco_gt.imgs) == 126 and broken["zero_size"] not in coco_gt.anns
    assert len(coco_gt.anns) == 939 - dropped_annotations


def test_unchecked_truncated_image_fails_naming_the_file(corrupted_coco128):
    image_dir, annotation_file, broken = corrupted_coco128
    dataset = CocoDetection(image_dir, annotation_file, invalid_annotations="skip", check_images="none")
    index = [str(name) for name in dataset.file_names].index(broken["truncated"])
    with pytest.raises(RuntimeError, match=f"cannot read image .*{broken['truncated']}"):
        dataset[index]


def test_full_decode_and_header_modes_find_the_truncation(corrupted_coco128):
    image_dir, _, broken = corrupted_coco128
    path = os.path.join(image_dir, broken["truncated"])
    for mode in ("header", "full"):
        assert check_image_file(path, mode=mode)[0] == "truncated_image"
    assert check_image_file(os.path.join(image_dir, "nope.jpg"))[0] == "missing_image_file"


def test_bad_policy_values_are_refused_when_the_config_loads():
    with pytest.raises(ValueError, match="data.invalid_annotations: 'ignore' is not one of fail, skip"):
        load_config(None, ["data.invalid_annotations=ignore"])


def test_build_dataset_names_missing_config_paths(tmp_path):
    cfg = load_config(None, ["data.dataset=coco"])
    with pytest.raises(ValueError, match="data.train_images"):
        build_dataset(cfg, "train")
    cfg = load_config(None, ["data.dataset=coco", f"data.val_images={tmp_path}",
                             f"data.val_annotations={tmp_path / 'missing.json'}"])
    with pytest.raises(FileNotFoundError, match="data.val_annotations: .*missing.json"):
        build_dataset(cfg, "val")


def test_build_dataset_generates_the_synthetic_set(tmp_path):
    cfg = load_config(None, ["data.dataset=synthetic", f"data.synthetic_dir={tmp_path}",
                             "data.synthetic_train_images=5", "data.synthetic_val_images=3",
                             "data.synthetic_image_size=64", "data.val_short_side=48", "data.val_max_size=64"])
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (5, 3) and train.num_classes == 4
    image, target = val[0]
    assert image.shape[0] == 3 and max(image.shape[1:]) <= 64 and target["size"].tolist() == list(image.shape[1:])
    assert os.path.isfile(tmp_path / "train" / "annotations.json") and os.path.isdir(tmp_path / "val" / "images")


def _coco128_without_annotation_ids(tmp_path, indices):
    """coco128's annotations.json with the id deleted from the annotations at ``indices``."""
    with open(os.path.join(coco128_dir(), "annotations.json")) as handle:
        coco = json.load(handle)
    for index in indices:
        del coco["annotations"][index]["id"]
    path = tmp_path / "annotations.json"
    with open(path, "w") as handle:
        json.dump(coco, handle)
    return str(path), len(coco["annotations"])


def test_annotations_without_id_are_their_own_problem(tmp_path):
    # every id deleted used to read as 938 x duplicate_annotation_id (all of them "None")
    path, total = _coco128_without_annotation_ids(tmp_path, range(939))
    with pytest.raises(DatasetValidationError) as error:
        CocoDetection(os.path.join(coco128_dir(), "images"), path, check_images="none")
    message = str(error.value)
    assert f"(missing_annotation_id: {total})" in message and "duplicate_annotation_id" not in message
    assert "annotations[0]: annotation has no id" in message


def test_skip_policy_drops_annotations_without_id(tmp_path, caplog):
    # with skip, pycocotools used to get the one id-less annotation kept and raise KeyError: 'id'
    path, total = _coco128_without_annotation_ids(tmp_path, [2, 40, 41])
    with caplog.at_level(logging.WARNING, logger="detr_cuda.data.validate"):
        dataset = CocoDetection(os.path.join(coco128_dir(), "images"), path, invalid_annotations="skip",
                                check_images="none")
    assert "skipping 0 image(s) and 3 annotation(s)" in caplog.text
    assert "annotations[40]: annotation has no id" in caplog.text
    assert len(dataset) == 128 and len(dataset.load_coco_gt().anns) == total - 3
    dataset[0]
