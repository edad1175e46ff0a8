"""Detection transforms on (PIL image, target) pairs, written with PIL and torch only.

Inside the pipeline ``target["boxes"]`` is a float tensor (N, 4) of absolute
xyxy pixel coordinates of the current image, ``target["labels"]`` int64 (N,)
and ``target["size"]`` int64 (2,) (h, w) of the current image. The last step,
:class:`ToTensorNormalize`, turns the image into a normalised (3, H, W) float
tensor and the boxes into cxcywh normalised by the image (w, h), which is the
shared target format.

Randomness comes from torch's global generator, so a caller that seeds it
(the dataset does, per sample, see ``CocoDetection.__getitem__``) gets the
same augmentation every time.
"""
import numpy as np
import torch
from PIL import Image

from detr_cuda.util.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-box fields that must be filtered together with "boxes" when boxes are removed.
_PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def _rand_int(low, high):
    """Uniform integer in [low, high] (both inclusive) from torch's global generator."""
    return int(torch.randint(low, high + 1, (1,)).item())


def _keep_boxes(target, keep):
    """Filters every per-box field of ``target`` with the bool mask ``keep`` (N,)."""
    for key in _PER_BOX_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


def resized_size(image_size, short_side, max_size=None):
    """(h, w) after resizing so the shorter side is ``short_side`` and the longer <= ``max_size``.

    The original's rule: when the longer side would exceed ``max_size``, the
    short side becomes round(max_size * short / long); the other side is then
    scaled and truncated with int(). ``image_size`` is (w, h) as PIL gives it.

    Unlike the original, no side goes below 1 pixel: an image whose longer
    side is more than ``max_size`` times its shorter one (4 x 2000 at
    max_size 1333) would get a short side of round(< 0.5) = 0, which PIL
    refuses. The short side is then 1 and the long side is capped at
    ``max_size`` (the aspect ratio gives way, boxes are scaled per axis).
    """
    width, height = image_size
    pinned = False  # the short side was raised to 1; the long side is then capped at max_size
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * short_side > max_size:
            short_side = int(round(max_size * short / long))
            if short_side < 1:
                short_side, pinned = 1, True
    if (width <= height and width == short_side) or (height <= width and height == short_side):
        long_side = max(width, height)
    else:
        long_side = max(1, int(short_side * max(width, height) / min(width, height)))
    if pinned:
        long_side = min(long_side, max_size)
    return (long_side, short_side) if width < height else (short_side, long_side)


def hflip(image, target):
    width, _ = image.size
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
    target = dict(target)
    boxes = target["boxes"]
    if boxes.numel():
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image, target


def resize(image, target, short_side, max_size=None):
    """Resizes (bilinear) so the shorter side is ``short_side`` (see :func:`resized_size`); scales boxes."""
    new_h, new_w = resized_size(image.size, short_side, max_size)
    old_w, old_h = image.size
    if (new_w, new_h) != (old_w, old_h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    target = dict(target)
    scale = torch.tensor([new_w / old_w, new_h / old_h, new_w / old_w, new_h / old_h], dtype=torch.float32)
    target["boxes"] = target["boxes"] * scale
    if "area" in target:
        target["area"] = target["area"] * (scale[0] * scale[1])
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image, target


def crop(image, target, top, left, height, width):
    """Crops the (top, left, height, width) region; boxes are clipped and those left without area removed."""
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    target["boxes"] = boxes
    if "area" in target:
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, _keep_boxes(target, keep)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomHorizontalFlip:
    def __init__(self, prob=0.5):
        self.prob = prob

    def __call__(self, image, target):
        if torch.rand(()).item() < self.prob:
            return hflip(image, target)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip({self.prob})"


class RandomResize:
    """Resize with the shorter side drawn uniformly from ``short_sides``, longer side <= ``max_size``."""

    def __init__(self, short_sides, max_size=None):
        if not short_sides:
            raise ValueError("RandomResize: short_sides must not be empty")
        self.short_sides = list(short_sides)
        self.max_size = max_size

    def __call__(self, image, target):
        side = self.short_sides[_rand_int(0, len(self.short_sides) - 1)]
        return resize(image, target, side, self.max_size)

    def __repr__(self):
        return f"RandomResize({self.short_sides}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop of random width in [min_size, min(w, max_size)] and height likewise, at a random place.

    When the image is smaller than ``min_size`` the crop bound is the image
    itself (the original would fail there; small-image configs reach it).
    """

    def __init__(self, min_size, max_size):
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        img_w, img_h = image.size
        crop_w = _rand_int(min(self.min_size, img_w), min(img_w, self.max_size))
        crop_h = _rand_int(min(self.min_size, img_h), min(img_h, self.max_size))
        top = _rand_int(0, img_h - crop_h)
        left = _rand_int(0, img_w - crop_w)
        return crop(image, target, top, left, crop_h, crop_w)

    def __repr__(self):
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Applies ``first`` with probability ``prob``, otherwise ``second``."""

    def __init__(self, first, second, prob=0.5):
        self.first, self.second, self.prob = first, second, prob

    def __call__(self, image, target):
        if torch.rand(()).item() < self.prob:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self):
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.prob})"


class ToTensorNormalize:
    """PIL RGB image -> (3, H, W) float normalised with mean/std; boxes -> cxcywh / (w, h, w, h)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        # (pixel / 255 - mean) / std as one multiply-add; numpy on the (H, W, 3) layout is several
        # times faster than torch ops on the permuted view on a busy CPU.
        std = np.asarray(std, dtype=np.float32)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.shift = (np.asarray(mean, dtype=np.float32) / std).astype(np.float32)

    def __call__(self, image, target):
        width, height = image.size
        pixels = np.asarray(image, dtype=np.float32) * self.scale - self.shift  # (H, W, 3)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        target = dict(target)
        boxes = target["boxes"]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target["boxes"] = box_xyxy_to_cxcywh(boxes) / scale if boxes.numel() else boxes.reshape(0, 4)
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return tensor, target

    def __repr__(self):
        return "ToTensorNormalize()"


def build_transforms(data_cfg, train):
    """Training or evaluation pipeline from ``DataConfig`` (detr_cuda/config.py).

    train: optional horizontal flip, then either a multi-scale resize
    (``train_short_sides``, ``train_max_size``) or, with probability 0.5 when
    ``random_crop``, resize to one of ``crop_resize_sides`` -> random crop
    ``crop_min_size..crop_max_size`` -> multi-scale resize; then normalisation.
    eval: resize to ``val_short_side`` (longer side <= ``val_max_size``), normalisation.
    """
    for name in ("train_short_sides", "crop_resize_sides"):
        sizes = getattr(data_cfg, name)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"data.{name} must be a non-empty list of positive sizes, got {sizes}")
    for name in ("train_max_size", "val_short_side", "val_max_size", "crop_min_size"):
        if getattr(data_cfg, name) < 1:
            raise ValueError(f"data.{name} must be positive, got {getattr(data_cfg, name)}")
    if data_cfg.crop_min_size > data_cfg.crop_max_size:
        raise ValueError(f"data.crop_min_size ({data_cfg.crop_min_size}) > data.crop_max_size "
                         f"({data_cfg.crop_max_size})")
    if not train:
        return Compose([RandomResize([data_cfg.val_short_side], data_cfg.val_max_size), ToTensorNormalize()])
    steps = []
    if data_cfg.horizontal_flip:
        steps.append(RandomHorizontalFlip(0.5))
    multi_scale = RandomResize(data_cfg.train_short_sides, data_cfg.train_max_size)
    if data_cfg.random_crop:
        crop_branch = Compose([
            RandomResize(data_cfg.crop_resize_sides),
            RandomSizeCrop(data_cfg.crop_min_size, data_cfg.crop_max_size),
            RandomResize(data_cfg.train_short_sides, data_cfg.train_max_size),
        ])
        steps.append(RandomSelect(multi_scale, crop_branch, 0.5))
    else:
        steps.append(multi_scale)
    steps.append(ToTensorNormalize())
    return Compose(steps)


def describe_preprocessing(data_cfg, canvas=None):
    """What evaluation does to an image before the model sees it, as plain values for a deployment
    (export.json): the resize rule, the normalisation, and, for a fixed-size exported graph,
    ``canvas`` (height, width) into which the resized image is padded."""
    description = {
        "color": "RGB, pixel values / 255 (a camera's EXIF orientation applied by tools/infer.py, "
                 "not by training or evaluation)",
        "resize": {"short_side": data_cfg.val_short_side, "max_size": data_cfg.val_max_size,
                   "interpolation": "bilinear",
                   "rule": "shorter side to short_side unless the longer side would then exceed max_size; "
                           "then the longer side to max_size (short side round(max_size * short / long), "
                           "long side truncated); detr_cuda.data.transforms.resized_size"},
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "formula": "(x - mean) / std"},
        "layout": "images (B, 3, H, W) float32",
    }
    if canvas is not None:
        description["canvas"] = {
            "height": canvas[0], "width": canvas[1],
            "padding": "the resized image at the top left, zeros to the bottom and right; padding_mask (B, H, W) "
                       "bool is True on padded pixels",
            "outputs": "pred_logits (B, Q, K): sigmoid gives scores; pred_boxes (B, Q, 4): cx, cy, w, h as "
                       "fractions of the resized image (not the canvas): multiply by the original width and height"}
    return description

