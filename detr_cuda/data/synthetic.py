"""A generated COCO-format detection dataset, so training and the demo need no download.

Four classes, each a distinct shape *and* colour (separable by either cue),
with sparse category ids so the label <-> category-id map is exercised:

    id 3 "circle" (red), id 7 "square" (green), id 12 "triangle" (blue), id 20 "cross" (yellow)

Objects are 15-45 % of the shorter image side, slightly stretched, jittered
in colour, placed anywhere inside the image with limited overlap (IoU <= 0.3
between boxes). Backgrounds are smooth low-saturation colour fields plus pixel
noise; about 8 % of the images have no object. Image i depends only on
(seed, i), and the whole output only on the spec, so generation is
deterministic; a folder that already holds the same spec is left alone.

Layout: ``out_dir/images/000001.jpg ...``, ``out_dir/annotations.json``,
``out_dir/spec.json``. Command line::

    python -m detr_cuda.data.synthetic --out data_generated/synthetic/train --num-images 256
"""
import argparse
import json
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
CATEGORIES = (  # (category id, name, RGB)
    (3, "circle", (215, 35, 35)),
    (7, "square", (30, 165, 55)),
    (12, "triangle", (35, 80, 225)),
    (20, "cross", (235, 195, 20)),
)
OBJECT_COUNT_PROBS = (0.08, 0.27, 0.30, 0.20, 0.15)  # P(0 objects), P(1), ..., P(4)
MAX_BOX_IOU = 0.3


def _iou_xywh(a, b):
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _background(rng, width, height):
    """(height, width, 3) uint8: a smooth low-saturation colour field with pixel noise."""
    grid = rng.uniform(70, 180, size=(4, 4, 1)) + rng.uniform(-18, 18, size=(4, 4, 3))
    field = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), mode="RGB").resize(
        (width, height), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw_object(draw, shape, box, colour):
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=colour)
    elif shape == "triangle":
        draw.polygon([((x + x1) / 2, y), (x, y1), (x1, y1)], fill=colour)
    elif shape == "cross":
        bar_w, bar_h = max(2, w // 3), max(2, h // 3)
        draw.rectangle([x + (w - bar_w) // 2, y, x + (w - bar_w) // 2 + bar_w - 1, y1], fill=colour)
        draw.rectangle([x, y + (h - bar_h) // 2, x1, y + (h - bar_h) // 2 + bar_h - 1], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_image(seed, index, image_size):
    """Image ``index`` of the set: (PIL RGB image, [(category_id, [x, y, w, h]), ...])."""
    rng = np.random.default_rng([seed, index])
    width = int(round(image_size * rng.uniform(0.75, 1.0)))
    height = int(round(image_size * rng.uniform(0.75, 1.0)))
    image = Image.fromarray(_background(rng, width, height), mode="RGB")
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS)):
        category_id, shape, colour = CATEGORIES[rng.integers(len(CATEGORIES))]
        for _attempt in range(20):
            side = rng.uniform(0.15, 0.45) * min(width, height)
            stretch = rng.uniform(0.8, 1.25)
            w, h = max(4, int(side * stretch)), max(4, int(side / stretch))
            box = [int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h]
            if all(_iou_xywh(box, other) <= MAX_BOX_IOU for _, other in objects):
                break
        else:
            continue
        jittered = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in colour)
        _draw_object(draw, shape, box, jittered)
        objects.append((category_id, box))
    return image, objects


def _spec(num_images, image_size, seed, image_format):
    return {"generator_version": GENERATOR_VERSION, "num_images": num_images, "image_size": image_size,
            "seed": seed, "image_format": image_format}


def _read_spec(out_dir):
    try:
        with open(os.path.join(out_dir, "spec.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def generate_synthetic_coco(out_dir, num_images, image_size=256, seed=0, image_format="jpg"):
    """Writes the dataset into ``out_dir`` unless it already holds this spec.

    Returns {"images": image folder, "annotations": instances JSON path,
    "generated": whether files were written}. The set is built in a temporary
    sibling folder and renamed into place, so an interrupted run never leaves
    a half-written dataset that looks complete.
    """
    if num_images < 1 or image_size < 32:
        raise ValueError(f"need num_images >= 1 and image_size >= 32, got {num_images}, {image_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = os.path.abspath(out_dir)
    paths = {"images": os.path.join(out_dir, "images"), "annotations": os.path.join(out_dir, "annotations.json")}
    spec = _spec(num_images, image_size, seed, image_format)
    if _read_spec(out_dir) == spec and os.path.isfile(paths["annotations"]):
        return dict(paths, generated=False)

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(os.path.join(tmp_dir, "images"))
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_image(seed, index, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.{image_format}"
        save_args = {"quality": 92} if image_format == "jpg" else {}
        image.save(os.path.join(tmp_dir, "images", file_name), **save_args)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for category_id, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    coco_dict = {
        "info": {"description": "detr_cuda synthetic shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES],
        "images": images,
        "annotations": annotations,
    }
    with open(os.path.join(tmp_dir, "annotations.json"), "w") as handle:
        json.dump(coco_dict, handle)
    with open(os.path.join(tmp_dir, "spec.json"), "w") as handle:
        json.dump(spec, handle, indent=1)

    if os.path.isdir(out_dir):
        if _read_spec(out_dir) == spec:  # another process finished the same set meanwhile
            shutil.rmtree(tmp_dir)
            return dict(paths, generated=False)
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        if _read_spec(out_dir) != spec:  # not another process that won the same race
            raise
        shutil.rmtree(tmp_dir)
        return dict(paths, generated=False)
    return dict(paths, generated=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", "--num_images", type=int, default=256)
    parser.add_argument("--image-size", "--image_size", type=int, default=256, help="longest possible side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args(argv)
    result = generate_synthetic_coco(args.out, args.num_images, args.image_size, args.seed, args.format)
    state = "generated" if result["generated"] else "already present (same spec)"
    print(f"{state}: {result['images']} and {result['annotations']}")


if __name__ == "__main__":
    main()
