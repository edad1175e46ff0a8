import json

import pytest
import torch
from PIL import Image

from detr_cuda.config import DataConfig
from detr_cuda.data import CocoDetection, build_transforms


def write_dataset(root, images, annotations, categories):
    """images: list of (file_name, PIL image); writes root/images/* and root/ann.json."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, (file_name, image) in enumerate(images, start=1):
        image.save(root / "images" / file_name)
        entries.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
    with open(root / "ann.json", "w") as handle:
        json.dump({"images": entries, "annotations": annotations, "categories": categories}, handle)
    return str(root / "images"), str(root / "ann.json")


def ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}, {"id": 17, "name": "cat"}]


@pytest.fixture
def small_dataset(tmp_path):
    images = [
        ("rgb.jpg", Image.new("RGB", (64, 48), (200, 10, 10))),
        ("gray.png", Image.new("L", (40, 30), 128)),
        ("cmyk.jpg", Image.new("CMYK", (50, 50), (0, 255, 255, 0))),
        ("rgba.png", Image.new("RGBA", (32, 32), (0, 0, 255, 100))),
        ("empty.jpg", Image.new("RGB", (20, 20))),
    ]
    annotations = [
        ann(1, 1, 17, [10, 5, 20, 10]),
        ann(2, 1, 90, [0, 0, 64, 48]),
        ann(3, 1, 5, [30, 20, 10, 10], iscrowd=1),
        ann(4, 2, 5, [35, 25, 5.5, 5.5]),       # reaches 0.5 px past the right/bottom edge: clamped
        ann(5, 3, 90, [49.5, 10, 0.5, 10]),     # valid but 0.5 px wide
        ann(6, 4, 17, [1, 1, 4, 4]),
        ann(7, 3, 5, [-0.9, 5, 0.8, 5]),        # within the 1 px tolerance, but nothing left after clamping
    ]
    return write_dataset(tmp_path, images, annotations, CATEGORIES)


def test_sparse_category_ids_map_to_contiguous_labels_and_back(small_dataset):
    dataset = CocoDetection(*small_dataset)
    assert dataset.num_classes == 3
    assert dataset.label_to_category_id == [5, 17, 90]
    assert dataset.class_names == ["airplane", "cat", "toothbrush"]
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2]  # crowd annotation 3 left out
    back = [dataset.label_to_category_id[label] for label in target["labels"].tolist()]
    assert back == [17, 90]
    assert dataset.categories.to_dict() == {"label_to_category_id": [5, 17, 90],
                                            "class_names": ["airplane", "cat", "toothbrush"]}


def test_any_image_mode_becomes_rgb(small_dataset):
    dataset = CocoDetection(*small_dataset)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.mode == "RGB"
        assert target["orig_size"].tolist() == [image.height, image.width]
    normalised = CocoDetection(*small_dataset, transforms=build_transforms(DataConfig(val_short_side=32), False))
    tensor, target = normalised[1]  # the grayscale image
    assert tensor.shape == (3, 32, 42)
    assert torch.allclose(tensor[0], tensor[0, 0, 0]) and not torch.allclose(tensor[0], tensor[1])


def test_boxes_are_clamped_and_images_without_boxes_are_kept(small_dataset):
    dataset = CocoDetection(*small_dataset)
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[35.0, 25.0, 40.0, 30.0]]
    _, target = dataset[2]
    assert target["boxes"].tolist() == [[49.5, 10.0, 50.0, 20.0]]  # annotation 7 dropped, 5 kept
    _, target = dataset[4]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["image_id"].item() == 5 and target["image_id"].dtype == torch.int64
    transformed = CocoDetection(*small_dataset, transforms=build_transforms(DataConfig(val_short_side=16), False))
    _, target = transformed[4]
    assert target["boxes"].shape == (0, 4) and target["size"].tolist() == [16, 16]


def test_coco_ground_truth_keeps_crowd_regions(small_dataset):
    dataset = CocoDetection(*small_dataset)
    coco = dataset.load_coco_gt()
    assert len(coco.getAnnIds(iscrowd=True)) == 1
    assert "5 images (1 without boxes), 6 boxes, 1 crowd" in dataset.summary()


def test_seeded_index_makes_augmentation_reproducible(small_dataset):
    cfg = DataConfig(train_short_sides=[16, 24, 32, 40], train_max_size=64, crop_resize_sides=[30, 40],
                     crop_min_size=10, crop_max_size=30)
    dataset = CocoDetection(*small_dataset, transforms=build_transforms(cfg, train=True))
    first = [dataset[(0, seed)] for seed in range(6)]
    torch.manual_seed(123)  # the caller's generator must not matter...
    again = [dataset[(0, seed)] for seed in range(6)]
    state = torch.get_rng_state()
    for (image_a, target_a), (image_b, target_b) in zip(first, again):
        assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    assert torch.equal(state, torch.get_rng_state())  # ...and is left untouched
    assert len({tuple(image.shape) for image, _ in first}) > 1  # different seeds, different sizes


def test_cache_images_gives_the_same_samples(small_dataset):
    plain = CocoDetection(*small_dataset)
    cached = CocoDetection(*small_dataset, cache_images=True)
    for index in range(len(plain)):
        assert plain[index][0].tobytes() == cached[index][0].tobytes()


def test_missing_paths_are_named(tmp_path, small_dataset):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(small_dataset[0], str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="no_images"):
        CocoDetection(str(tmp_path / "no_images"), small_dataset[1])


def test_subset_keeps_images_targets_and_category_map(small_dataset):
    dataset = CocoDetection(*small_dataset, cache_images=True)
    subset = dataset.subset([4, 0])
    assert len(subset) == 2 and subset.label_to_category_id == dataset.label_to_category_id
    for sub_index, index in enumerate([4, 0]):
        image_a, target_a = subset[sub_index]
        image_b, target_b = dataset[index]
        assert image_a.tobytes() == image_b.tobytes()
        assert all(torch.equal(target_a[k], target_b[k]) for k in target_b)
    assert len(dataset) == 5
    with pytest.raises(IndexError, match="subset indices"):
        dataset.subset([5])


def test_bad_categories_and_empty_sets_are_named(tmp_path):
    image = [("a.jpg", Image.new("RGB", (8, 8)))]
    paths = write_dataset(tmp_path / "dup", image, [], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="distinct integer ids"):
        CocoDetection(*paths)
    paths = write_dataset(tmp_path / "none", [], [], CATEGORIES)
    with pytest.raises(ValueError, match="ann.json: no images"):
        CocoDetection(*paths)
