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
``out_dir/spec.json``; :func:`write_layout` also writes it as YOLO labels or VOC XML. Command line::

    python -m detr_cuda.data.synthetic --out data_generated/synthetic/train --num-images 256
    python -m detr_cuda.data.synthetic --out data_generated/shapes_yolo --layout yolo --split val
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


def write_layout(coco_dir, out_dir, layout, split):
    """Writes the generated set in ``coco_dir`` (images/, annotations.json) into ``out_dir`` in another
    ``layout``, to try data.format=yolo / voc and tools/convert_dataset.py on:

    - "yolo": images/<split>/, labels/<split>/*.txt (class cx cy w h fractions; class k = the k-th of
      circle, square, triangle, cross) and data.yaml (names);
    - "voc": JPEGImages/<split>_<name>, Annotations/<split>_<stem>.xml (1-based inclusive pixels),
      ImageSets/Main/<split>.txt.

    Returns the (image folder, annotation source) to train on.
    """
    with open(os.path.join(coco_dir, "annotations.json")) as handle:
        coco_dict = json.load(handle)
    index_of = {category["id"]: index for index, category in enumerate(coco_dict["categories"])}
    names = [category["name"] for category in coco_dict["categories"]]
    boxes = {image["id"]: [] for image in coco_dict["images"]}
    for annotation in coco_dict["annotations"]:
        boxes[annotation["image_id"]].append((annotation["category_id"], annotation["bbox"]))
    if layout == "yolo":
        return _write_yolo(coco_dir, out_dir, split, coco_dict["images"], boxes, index_of, names)
    return _write_voc(coco_dir, out_dir, split, coco_dict["images"], boxes, names)


def _write_yolo(coco_dir, out_dir, split, images, boxes, index_of, names):
    image_dir, label_dir = os.path.join(out_dir, "images", split), os.path.join(out_dir, "labels", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    for image in images:
        shutil.copy(os.path.join(coco_dir, "images", image["file_name"]), image_dir)
        width, height = image["width"], image["height"]
        lines = [f"{index_of[c]} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                 f"{w / width:.6f} {h / height:.6f}\n" for c, (x, y, w, h) in boxes[image["id"]]]
        with open(os.path.join(label_dir, os.path.splitext(image["file_name"])[0] + ".txt"), "w") as handle:
            handle.writelines(lines)
    with open(os.path.join(out_dir, "data.yaml"), "w") as handle:
        handle.write("names: [" + ", ".join(names) + "]\n")
    return image_dir, os.path.join(out_dir, "data.yaml")


def _write_voc(coco_dir, out_dir, split, images, boxes, names):
    folders = {name: os.path.join(out_dir, name) for name in ("JPEGImages", "Annotations", "ImageSets/Main")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    name_of = {category_id: name for (category_id, name, _), name in zip(CATEGORIES, names)}
    stems = []
    for image in images:
        stem = f"{split}_{os.path.splitext(image['file_name'])[0]}"
        file_name = stem + os.path.splitext(image["file_name"])[1]
        shutil.copy(os.path.join(coco_dir, "images", image["file_name"]),
                    os.path.join(folders["JPEGImages"], file_name))
        objects = "".join(f"<object><name>{name_of[c]}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                          f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                          for c, (x, y, w, h) in boxes[image["id"]])
        with open(os.path.join(folders["Annotations"], stem + ".xml"), "w") as handle:
            handle.write(f"<annotation><filename>{file_name}</filename><size><width>{image['width']}</width>"
                         f"<height>{image['height']}</height><depth>3</depth></size>{objects}</annotation>\n")
        stems.append(stem)
    split_list = os.path.join(folders["ImageSets/Main"], f"{split}.txt")
    with open(split_list, "w") as handle:
        handle.write("".join(stem + "\n" for stem in stems))
    return folders["JPEGImages"], split_list


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", "--num_images", type=int, default=256)
    parser.add_argument("--image-size", "--image_size", type=int, default=256, help="longest possible side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--layout", choices=("coco", "yolo", "voc"), default="coco",
                        help="yolo / voc: also written in that layout into --out (see write_layout)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="the split a yolo / voc layout holds")
    args = parser.parse_args(argv)
    coco_dir = args.out if args.layout == "coco" else os.path.join(args.out, f"coco_{args.split}")
    result = generate_synthetic_coco(coco_dir, args.num_images, args.image_size, args.seed, args.format)
    state = "generated" if result["generated"] else "already present (same spec)"
    print(f"{state}: {result['images']} and {result['annotations']}")
    if args.layout != "coco":
        images, annotations = write_layout(coco_dir, args.out, args.layout, args.split)
        print(f"{args.layout} layout: {images} and {annotations}")


if __name__ == "__main__":
    main()
