import pytest
import torch
from PIL import Image

from detr_cuda.config import DataConfig
from detr_cuda.data import transforms as T
from detr_cuda.util.box_ops import box_cxcywh_to_xyxy


def _sample(width=200, height=100):
    """A gradient image with two boxes (absolute xyxy) and their labels."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x % 256, y % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0], [150.0, 5.0, 200.0, 40.0]]),
              "labels": torch.tensor([1, 2]), "size": torch.tensor([height, width])}
    return image, target


def test_resized_size_follows_the_original_rule():
    # shorter side 800; longer 1333 cap: 640x480 -> 800 fits (1066 < 1333)
    assert T.resized_size((640, 480), 800, 1333) == (800, 1066)
    # 1000x200: 800 * 5 > 1333, short side becomes round(1333 * 200 / 1000) = 267
    assert T.resized_size((1000, 200), 800, 1333) == (267, 1335)
    assert T.resized_size((200, 1000), 800, 1333) == (1335, 267)
    assert T.resized_size((300, 300), 300, None) == (300, 300)


@pytest.mark.parametrize("size", [(4, 2000), (2000, 4), (1, 100000)])
def test_very_elongated_image_keeps_every_side_at_least_one_pixel(size):
    # round(128 * 4 / 2000) = 0 was the short side PIL refused ("height and width must be > 0");
    # it is now 1 and the long side stays within max_size
    height, width = T.resized_size(size, 128, 128)
    assert min(height, width) == 1 and max(height, width) == 128
    assert (height > width) == (size[1] > size[0])


@pytest.mark.parametrize("train", [False, True])
def test_pipelines_resize_a_very_elongated_image(train):
    cfg = DataConfig(train_short_sides=[128], train_max_size=128, val_short_side=128, val_max_size=128,
                     random_crop=False)
    image, target = _sample(4, 2000)
    target["boxes"] = torch.tensor([[0.0, 100.0, 4.0, 900.0]])
    target["labels"] = torch.tensor([0])
    torch.manual_seed(0)
    for _ in range(4):
        tensor, out = T.build_transforms(cfg, train=train)(image, target)
        assert tensor.shape[0] == 3 and min(tensor.shape[1:]) >= 1 and max(tensor.shape[1:]) <= 128
        assert out["size"].tolist() == list(tensor.shape[1:])


def test_hflip_mirrors_boxes_and_pixels():
    image, target = _sample()
    flipped, flipped_target = T.hflip(image, target)
    assert flipped.getpixel((0, 0)) == image.getpixel((199, 0))
    assert torch.equal(flipped_target["boxes"][0], torch.tensor([140.0, 20.0, 190.0, 80.0]))
    assert torch.equal(flipped_target["labels"], target["labels"])


def test_resize_scales_boxes_with_the_image():
    image, target = _sample()
    resized, resized_target = T.resize(image, target, 50, None)
    assert resized.size == (100, 50)
    assert torch.allclose(resized_target["boxes"][0], torch.tensor([5.0, 10.0, 30.0, 40.0]))
    assert resized_target["size"].tolist() == [50, 100]


def test_crop_clips_boxes_and_drops_those_left_empty():
    image, target = _sample()
    cropped, cropped_target = T.crop(image, target, top=30, left=0, height=60, width=100)
    assert cropped.size == (100, 60)
    # box 0 clipped to the crop; box 1 (x 150..200) lies outside and is removed with its label
    assert cropped_target["boxes"].tolist() == [[10.0, 0.0, 60.0, 50.0]]
    assert cropped_target["labels"].tolist() == [1]
    assert cropped.getpixel((0, 0)) == image.getpixel((0, 30))


def test_normalise_gives_cxcywh_relative_boxes_and_imagenet_stats():
    image, target = _sample()
    tensor, out = T.ToTensorNormalize()(image, target)
    assert tensor.shape == (3, 100, 200) and tensor.dtype == torch.float32
    expected0 = (image.getpixel((3, 2))[0] / 255 - 0.485) / 0.229
    assert tensor[0, 2, 3].item() == pytest.approx(expected0, abs=1e-5)
    assert torch.allclose(out["boxes"][0], torch.tensor([35 / 200, 50 / 100, 50 / 200, 60 / 100]))
    assert out["size"].tolist() == [100, 200]


@pytest.mark.parametrize("seed", range(12))
def test_training_pipeline_keeps_boxes_inside_and_consistent(seed):
    cfg = DataConfig(train_short_sides=[64, 96], train_max_size=160, crop_resize_sides=[80, 100],
                     crop_min_size=40, crop_max_size=90)
    pipeline = T.build_transforms(cfg, train=True)
    image, target = _sample()
    torch.manual_seed(seed)
    tensor, out = pipeline(image, target)
    height, width = tensor.shape[1:]
    assert out["size"].tolist() == [height, width]
    assert max(height, width) <= 160
    boxes = box_cxcywh_to_xyxy(out["boxes"])
    assert len(boxes) == len(out["labels"]) <= 2
    assert ((boxes >= 0) & (boxes <= 1 + 1e-6)).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all(), "degenerate boxes must be removed"
    assert set(out["labels"].tolist()) <= {1, 2}


def test_crop_pipeline_same_boxes_as_pixels():
    """A white square on black: after any train transform the box must frame the white pixels."""
    cfg = DataConfig(train_short_sides=[64, 80, 96], train_max_size=200, crop_resize_sides=[90, 110],
                     crop_min_size=50, crop_max_size=100)
    pipeline = T.build_transforms(cfg, train=True)
    for seed in range(15):
        image = Image.new("RGB", (160, 120))
        image.paste((255, 255, 255), (40, 30, 100, 90))
        target = {"boxes": torch.tensor([[40.0, 30.0, 100.0, 90.0]]), "labels": torch.tensor([0]),
                  "size": torch.tensor([120, 160])}
        torch.manual_seed(seed)
        tensor, out = pipeline(image, target)
        white = tensor[0] > 1.0  # normalised: white ~2.2, black ~-2.1
        height, width = white.shape
        if not len(out["boxes"]):
            assert white.sum() < 4, "box dropped though the object is visible"
            continue
        x0, y0, x1, y1 = (box_cxcywh_to_xyxy(out["boxes"])[0] * torch.tensor([width, height, width, height])).tolist()
        ys, xs = torch.nonzero(white, as_tuple=True)
        assert abs(xs.min().item() - x0) <= 1.5 and abs(xs.max().item() + 1 - x1) <= 1.5
        assert abs(ys.min().item() - y0) <= 1.5 and abs(ys.max().item() + 1 - y1) <= 1.5


def test_eval_pipeline_is_deterministic_resize():
    cfg = DataConfig(val_short_side=50, val_max_size=1000)
    image, target = _sample()
    tensor, out = T.build_transforms(cfg, train=False)(image, target)
    assert tensor.shape == (3, 50, 100)
    assert torch.allclose(out["boxes"][0], torch.tensor([35 / 200, 50 / 100, 50 / 200, 60 / 100]))


def test_random_size_crop_handles_images_smaller_than_min_size():
    image, target = _sample(30, 20)
    target["boxes"] = torch.tensor([[2.0, 2.0, 10.0, 10.0]])
    target["labels"] = torch.tensor([0])
    torch.manual_seed(0)
    cropped, _ = T.RandomSizeCrop(64, 128)(image, target)
    assert cropped.size == (30, 20)


@pytest.mark.parametrize("override, message", [
    ({"train_short_sides": []}, "data.train_short_sides must be a non-empty list"),
    ({"crop_min_size": 700}, r"data.crop_min_size \(700\) > data.crop_max_size \(600\)"),
    ({"val_max_size": 0}, "data.val_max_size must be positive"),
])
def test_bad_sizes_name_the_config_field(override, message):
    with pytest.raises(ValueError, match=message):
        T.build_transforms(DataConfig(**override), train=True)
