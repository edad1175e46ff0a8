"""COCO-format detection dataset: an image folder and an instances JSON (or YOLO labels / VOC XML,
read into the same form: :func:`read_annotations`), indexed through pycocotools.

Category ids may be sparse (COCO uses 1..90 with gaps): they are sorted and
mapped to contiguous labels 0..K-1. ``label_to_category_id`` and
``class_names`` give the way back; they go into checkpoints and the evaluator
uses them to write predictions in the dataset's own ids. ``num_classes`` is K,
the number of entries in ``categories``.

Crowd regions (``iscrowd=1``) are left out of the training targets; they stay
in the ground truth that :meth:`CocoDetection.load_coco_gt` returns, where
pycocotools treats them as "ignore" regions. Images without boxes are kept.

EXIF orientation is not applied: COCO boxes refer to the stored pixel layout
(the validator reports files whose size differs from the JSON's).

Per-image data is held in flat numpy arrays (not lists of dicts), so forked
data-loader workers do not slowly copy the parent's annotation objects.
"""
import contextlib
import copy
import io
import json
import logging
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from ..categories import CategoryMap
from ..util import dist
from .validate import AnnotationFileError, DatasetValidationError, apply_policy, validate_coco_dict
from .voc import read_voc
from .yolo import read_yolo

logger = logging.getLogger(__name__)


class UndecodableImageError(RuntimeError):
    """An image file that is there but whose data cannot be decoded (corrupt, truncated, not an image)."""


def load_instances_json(annotation_file):
    """Parsed instances JSON; a clear error naming the file when it is missing or malformed."""
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    with open(annotation_file, encoding="utf-8") as handle:
        try:
            coco_dict = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AnnotationFileError(f"{annotation_file}: not valid JSON: {error}") from error
    if not isinstance(coco_dict, dict) or "images" not in coco_dict or "categories" not in coco_dict:
        raise AnnotationFileError(f"{annotation_file}: not a COCO instances file (needs 'images' and 'categories')")
    coco_dict.setdefault("annotations", [])
    return coco_dict


def read_annotations(annotation_source, image_dir, annotation_format="coco", invalid_annotations="fail"):
    """The COCO instances dict of a data set whose annotations are in ``annotation_format``:
    "coco" (``annotation_source`` is the instances JSON), "yolo" (its data.yaml or names file; the
    labels beside ``image_dir``, see data/yolo.py) or "voc" (its Annotations folder or split list,
    see data/voc.py)."""
    if annotation_format == "coco":
        return load_instances_json(annotation_source)
    if annotation_format == "yolo":
        return read_yolo(image_dir, annotation_source, invalid_annotations)
    if annotation_format == "voc":
        return read_voc(annotation_source, image_dir)
    raise ValueError(f"unknown annotation format {annotation_format!r} (coco, yolo or voc)")


def coco_from_dict(coco_dict):
    """pycocotools COCO object over an in-memory instances dict (its progress prints silenced)."""
    coco = COCO()
    coco.dataset = coco_dict
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_categories(coco_dict, annotation_file):
    """Raises AnnotationFileError unless 'categories' is a non-empty list of dicts with distinct integer ids."""
    categories = coco_dict["categories"]
    ids = [c.get("id") if isinstance(c, dict) else None for c in categories] if isinstance(categories, list) else None
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) != len(ids):
        raise AnnotationFileError(f"{annotation_file}: 'categories' must be a non-empty list of entries with "
                                  f"distinct integer ids, got ids {ids[:20] if ids else categories!r}")


def to_rgb(image):
    """Any PIL mode (L, LA, P, CMYK, RGBA, 16-bit or float grayscale) -> RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = pixels.max() if pixels.size and pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


class LabelledDataset(torch.utils.data.Dataset):
    """A data set whose ``categories`` (CategoryMap) say what its labels 0..K-1 are."""

    @property
    def num_classes(self):
        return self.categories.num_labels

    @property
    def label_to_category_id(self):
        return self.categories.label_to_category_id

    @property
    def class_names(self):
        return self.categories.class_names


class CocoDetection(LabelledDataset):
    """``dataset[i]`` -> (image, target).

    image: (3, H, W) float normalised tensor after ``transforms`` (a PIL RGB
    image when ``transforms`` is None).
    target: ``labels`` int64 (N,) contiguous 0..K-1; ``boxes`` float (N, 4)
    cxcywh normalised by the transformed image (absolute xyxy pixels when
    ``transforms`` is None); ``image_id`` int64 scalar; ``orig_size`` int64 (2,)
    (h, w) of the file; ``size`` int64 (2,) (h, w) after the transforms.

    With ``substitute_unreadable`` a target may also hold ``substitute_for``: the path of the
    broken image this sample stands in for.

    The index may also be a pair (index, seed): the transforms then run under
    torch's generator seeded with ``seed`` (the sampler of
    :func:`detr_cuda.data.loader.build_dataloader` does this), so augmentation
    depends only on (seed, epoch, index), not on workers or the caller's RNG.
    """

    def __init__(self, image_dir, annotation_file, transforms=None, invalid_annotations="fail",
                 check_images="header", cache_images=False, share_validation=False, substitute_unreadable=False,
                 annotation_format="coco"):
        """``annotation_file``: the annotations in ``annotation_format`` (:func:`read_annotations`).
        ``share_validation``: under torch.distributed, rank 0 alone runs the validation (the file
        checks cost I/O) and broadcasts its report; every rank must then build the dataset.
        ``substitute_unreadable``: an image that fails to decode is replaced by the next readable
        entry (with a warning naming it, once per process, and ``target["substitute_for"]`` set),
        so a file corrupt in its middle does not stop a training run; otherwise it raises."""
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.transforms = transforms
        self.substitute_unreadable = substitute_unreadable
        self.annotation_format = annotation_format
        self._warned_unreadable = set()
        raw = read_annotations(annotation_file, image_dir, annotation_format, invalid_annotations)
        check_categories(raw, annotation_file)
        if share_validation and dist.is_dist():
            report = validate_coco_dict(raw, image_dir, check_images, source=annotation_file) \
                if dist.is_main_process() else None
            self.report = dist.broadcast_object(report)
        else:
            self.report = validate_coco_dict(raw, image_dir, check_images, source=annotation_file)
        missing = self.report.counts().get("missing_image_file", 0)
        if raw["images"] and missing == len(raw["images"]):
            raise DatasetValidationError(
                f"none of the {missing} images that {annotation_file} lists is in {image_dir} (e.g. "
                f"{raw['images'][0].get('file_name')}): the image folder is probably the wrong one "
                "(data.train_images / data.val_images)")
        coco = coco_from_dict(apply_policy(raw, self.report, invalid_annotations,
                                           log=not share_validation or dist.is_main_process()))
        raw_count = len(raw["images"])
        del raw
        if not coco.imgs:
            raise DatasetValidationError(f"{annotation_file}: no images" + (
                " left after validation (every image entry had a problem; see the report above)" if raw_count else ""))
        self.categories = CategoryMap.from_categories(coco.dataset["categories"])
        self.category_id_to_label = {cat_id: label for label, cat_id in enumerate(self.label_to_category_id)}

        image_ids = sorted(coco.imgs)
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.file_names = np.asarray([coco.imgs[i]["file_name"] for i in image_ids])
        offsets, boxes, labels = [0], [], []
        self.num_crowd = 0
        for image_id in image_ids:
            for annotation in coco.imgToAnns.get(image_id, []):
                if annotation.get("iscrowd", 0):
                    self.num_crowd += 1
                    continue
                boxes.append(annotation["bbox"])
                labels.append(self.category_id_to_label[annotation["category_id"]])
            offsets.append(len(labels))
        self.box_offsets = np.asarray(offsets, dtype=np.int64)          # (N + 1,) per-image slices
        self.boxes_xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (M, 4) as in the JSON
        self.labels = np.asarray(labels, dtype=np.int64)                # (M,)
        del coco

        self._cache = self._read_all_images() if cache_images else None

    # ----------------------------------------------------------------------------------------------
    def load_coco_gt(self):
        """pycocotools ground truth (crowd regions included) with the same entries dropped as for training."""
        raw = read_annotations(self.annotation_file, self.image_dir, self.annotation_format, "skip")
        if not self.report.ok:  # the dataset was built with policy "skip", else it would have raised
            raw = apply_policy(raw, self.report, "skip", log=False)
        return coco_from_dict(raw)

    def subset(self, indices):
        """A dataset over entries ``indices`` only (same category map, transforms and ground truth file).

        Use this rather than ``torch.utils.data.Subset``, which cannot take the
        (index, seed) keys of the training sampler. Evaluation counts only the
        images seen, so the full ground truth still evaluates a subset correctly.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"subset indices must be in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        starts, ends = self.box_offsets[indices], self.box_offsets[indices + 1]
        box_index = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)] + [np.zeros(0, np.int64)])
        subset = copy.copy(self)
        subset.image_ids, subset.file_names = self.image_ids[indices], self.file_names[indices]
        subset.box_offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        subset.boxes_xywh, subset.labels = self.boxes_xywh[box_index], self.labels[box_index]
        if self._cache is not None:
            data, offsets = self._cache
            chunks = [data[offsets[i]:offsets[i + 1]] for i in indices]
            new_offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
            subset._cache = (np.concatenate(chunks + [np.zeros(0, np.uint8)]), new_offsets)
        return subset

    def summary(self):
        """A few lines for the log: images, empty images, boxes per class."""
        per_image = np.diff(self.box_offsets)
        per_class = np.bincount(self.labels, minlength=self.num_classes)
        lines = [f"{self.annotation_file}: {len(self)} images ({int((per_image == 0).sum())} without boxes), "
                 f"{len(self.labels)} boxes, {self.num_crowd} crowd regions (ignored in training), "
                 f"{self.num_classes} classes, {len(self.report.problems)} validation problem(s)"]
        lines.append("  boxes per class: " + ", ".join(
            f"{name}({cat_id}): {int(n)}"
            for name, cat_id, n in zip(self.class_names, self.label_to_category_id, per_class)))
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------------------
    def __len__(self):
        return len(self.image_ids)

    def _path(self, index):
        return os.path.join(self.image_dir, str(self.file_names[index]))

    def _read_all_images(self):
        chunks = []
        for index in range(len(self)):
            with open(self._path(index), "rb") as handle:
                chunks.append(np.frombuffer(handle.read(), dtype=np.uint8))
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(c) for c in chunks])
        logger.info("cached %d images (%.1f MiB) in memory", len(chunks), offsets[-1] / 2 ** 20)
        return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8), offsets

    def load_image(self, index):
        """The RGB PIL image of entry ``index``. Raises UndecodableImageError (naming the file) when the
        file is there but its data is broken, RuntimeError when it cannot be opened at all."""
        path = self._path(index)
        where = f"{path} (image_id {int(self.image_ids[index])})"
        try:
            if self._cache is not None:
                data, offsets = self._cache
                image = Image.open(io.BytesIO(data[offsets[index]:offsets[index + 1]].tobytes()))
            else:
                image = Image.open(path)
        except OSError as error:
            if isinstance(error, UnidentifiedImageError):
                raise UndecodableImageError(f"cannot read image {where}: not an image file ({error})") from error
            raise RuntimeError(f"cannot read image {where}: {type(error).__name__}: {error}") from error
        try:
            image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for broken data
            raise UndecodableImageError(f"cannot read image {where}: {type(error).__name__}: {error}") from error
        return to_rgb(image)

    def _readable_image(self, index):
        """(index, image) of entry ``index``, or, with ``substitute_unreadable``, of the next entry
        whose image decodes (a warning names each broken file once per process)."""
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            try:
                return candidate, self.load_image(candidate)
            except UndecodableImageError as error:
                if not self.substitute_unreadable:
                    raise
                if candidate not in self._warned_unreadable:
                    self._warned_unreadable.add(candidate)
                    logger.warning("%s; training uses the next readable image in its place", error)
        raise RuntimeError(f"no image of {self.annotation_file} in {self.image_dir} can be decoded")

    def load_target(self, index, width, height):
        """Target with absolute xyxy boxes clamped to the (width, height) image; degenerate boxes dropped."""
        start, end = self.box_offsets[index], self.box_offsets[index + 1]
        boxes = torch.as_tensor(self.boxes_xywh[start:end], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        labels = torch.as_tensor(self.labels[start:end], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        size = torch.tensor([height, width], dtype=torch.int64)
        return {"boxes": boxes[keep], "labels": labels[keep],
                "image_id": torch.tensor(int(self.image_ids[index]), dtype=torch.int64),
                "orig_size": size, "size": size.clone()}

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        read_index, image = self._readable_image(index)
        target = self.load_target(read_index, *image.size)
        if read_index != index:
            target["substitute_for"] = self._path(index)
        if self.transforms is None:
            return image, target
        if seed is None:
            return self.transforms(image, target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transforms(image, target)
