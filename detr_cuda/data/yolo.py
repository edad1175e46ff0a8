"""YOLO-format labels read into a COCO instances dict, so validation, training and COCO evaluation
treat them like any COCO-format data set.

Layout (Ultralytics / Darknet)::

    images/train/a.jpg, ...        the image folder (sub-folders included)
    labels/train/a.txt, ...        one line per object: class cx cy w h, fractions of the image size
    data.yaml                      names: [person, bicycle, ...] (or {0: person, ...}); or a names
                                   file with one class name per line (classes.txt, obj.names)

The label folder is the image folder with its last ``images`` component replaced by ``labels``
when that folder exists, else the image folder itself (Darknet keeps a.txt beside a.jpg). An image
without a label file has no objects. A line with more than four numbers after the class is a
polygon (YOLO segmentation labels): its bounding box is used.

COCO terms: category id = the YOLO class index (0-based), named by the names list; image ids
from file names when all are numbers (:func:`detr_cuda.data.folders.image_ids_from_names`), else
1..N in sorted path order; ``file_name`` relative to the image folder; bbox x, y, w, h in pixels.
"""
import logging
import math
import os
from pathlib import Path

import yaml
from PIL import Image

from .folders import image_ids_from_names, list_image_files
from .validate import AnnotationFileError

logger = logging.getLogger(__name__)


def read_names(names_file):
    """Class names in class-index order from a data.yaml (``names`` as a list or {index: name}) or a
    text file with one name per line."""
    if not os.path.isfile(names_file):
        raise FileNotFoundError(f"YOLO class names file not found: {names_file}")
    with open(names_file, encoding="utf-8") as handle:
        text = handle.read()
    if not names_file.lower().endswith((".yaml", ".yml")):
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as error:
            raise AnnotationFileError(f"{names_file}: not a YOLO data.yaml mapping with 'names': {error}") from None
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise AnnotationFileError(f"{names_file}: 'names' keys must be the class indices 0..N-1, "
                                          f"got {sorted(names)[:10]}")
            names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise AnnotationFileError(f"{names_file}: no class names (a data.yaml needs 'names: [a, b, ...]'; a names "
                                  "file one name per line)")
    return [str(name) for name in names]


def labels_folder(image_dir):
    """Where the label files of ``image_dir`` are (module docstring)."""
    parts = Path(image_dir).parts
    if "images" in parts:
        last = len(parts) - 1 - parts[::-1].index("images")
        candidate = os.path.join(*parts[:last], "labels", *parts[last + 1:])
        if os.path.isdir(candidate):
            return candidate
    return image_dir


def parse_label_line(line, where):
    """'c cx cy w h' (or 'c x1 y1 x2 y2 ...', a polygon) -> (class index, (cx, cy, w, h) fractions)."""
    try:
        values = [float(value) for value in line.split()]
    except ValueError:
        raise AnnotationFileError(f"{where}: expected numbers 'class cx cy w h', got {line.strip()!r}") from None
    coordinates = values[1:]
    if len(coordinates) < 4 or (len(coordinates) > 4 and len(coordinates) % 2):
        raise AnnotationFileError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 ...', "
                                  f"got {len(values)} numbers")
    if not math.isfinite(values[0]) or values[0] != int(values[0]) or values[0] < 0:
        raise AnnotationFileError(f"{where}: class {values[0]:g} is not a class index (0, 1, ...)")
    if len(coordinates) > 4:
        xs, ys = coordinates[0::2], coordinates[1::2]
        box = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys))
    else:
        box = tuple(coordinates)
    return int(values[0]), box


def read_label_file(path, width, height):
    """[(class index, [x, y, w, h] pixels)] of one label file ([] when there is none)."""
    if not os.path.isfile(path):
        return []
    objects = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            class_index, (cx, cy, w, h) = parse_label_line(line, f"{path}:{number}")
            objects.append((class_index, [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]))
    return objects


def image_size(path):
    """(width, height) from the file's header; None when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 -- PIL raises many kinds for broken files; the caller names the file
        return None


def read_yolo(image_dir, names_file, invalid_annotations="fail"):
    """COCO instances dict (``images``, ``annotations``, ``categories``) of a YOLO data set.

    The label fractions need each image's pixel size: an image whose header cannot be read raises
    AnnotationFileError naming it, or with ``invalid_annotations="skip"`` is left out with a warning.
    """
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    names = read_names(names_file)
    labels_dir = labels_folder(image_dir)
    files = list_image_files(image_dir, recursive=True)
    images, annotations = [], []
    for relative, image_id in image_ids_from_names(files).items():
        size = image_size(os.path.join(image_dir, relative))
        if size is None:
            message = f"cannot read the size of image {os.path.join(image_dir, relative)} (YOLO boxes are fractions of it)"
            if invalid_annotations != "skip":
                raise AnnotationFileError(message + "; fix or remove it, or set data.invalid_annotations=skip")
            logger.warning("%s: skipped (data.invalid_annotations=skip)", message)
            continue
        images.append({"id": image_id, "file_name": relative, "width": size[0], "height": size[1]})
        label_path = os.path.join(labels_dir, os.path.splitext(relative)[0] + ".txt")
        for class_index, box in read_label_file(label_path, *size):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_index,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": index, "name": name} for index, name in enumerate(names)]}
