#!/usr/bin/env python
"""Write a COCO instances JSON from YOLO labels or Pascal VOC XML, so COCO tools and evaluation apply.

    python tools/convert_dataset.py yolo --images data/images/train --names data/data.yaml --output train.json
    python tools/convert_dataset.py voc --annotations VOC2007/ImageSets/Main/trainval.txt \\
        --images VOC2007/JPEGImages --output voc2007_trainval.json [--names voc_names.txt]

yolo: --images is the image folder (sub-folders included); the labels are found as training finds
them (the folder with its last 'images' replaced by 'labels', else beside the images); --names is
a data.yaml ('names') or a file with one class name per line. Category id = YOLO class index.
voc: --annotations is the Annotations folder or a split list (ImageSets/Main/x.txt); --images (for
<size>-less files; default: JPEGImages beside Annotations); --names fixes the class order (ids
1..K; default: the names found, sorted). 'difficult' objects become iscrowd=1.

The JSON's file_name entries are relative to --images: train with
data.train_images=<--images> data.train_annotations=<--output>. Training can also read YOLO and
VOC directly (data.format=yolo / voc); the JSON is for other tools and for checking.
Bad input: one line naming the file, exit 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True)
    yolo = formats.add_parser("yolo", help="YOLO labels/*.txt + class names")
    yolo.add_argument("--images", required=True, help="image folder")
    yolo.add_argument("--names", required=True, help="data.yaml or class names file")
    voc = formats.add_parser("voc", help="Pascal VOC XML")
    voc.add_argument("--annotations", required=True, help="Annotations folder or ImageSets/Main split list")
    voc.add_argument("--images", help="image folder (default: JPEGImages beside Annotations)")
    voc.add_argument("--names", help="class names file (one per line): fixes the category order")
    for sub in (yolo, voc):
        sub.add_argument("--output", required=True, help="COCO instances JSON to write")
    return parser.parse_args(argv)


def default_voc_images(annotations):
    """JPEGImages of the VOC folder that holds ``annotations`` (its Annotations folder or a split list)."""
    folder = os.path.abspath(annotations)
    root = os.path.dirname(folder) if os.path.isdir(folder) else os.path.join(os.path.dirname(folder), "..", "..")
    return os.path.normpath(os.path.join(root, "JPEGImages"))


def convert(args):
    """The COCO instances dict of the arguments' data set."""
    from detr_cuda.data.voc import read_voc
    from detr_cuda.data.yolo import read_names, read_yolo
    if args.format == "yolo":
        return read_yolo(args.images, args.names)
    names = read_names(args.names) if args.names else None
    return read_voc(args.annotations, args.images or default_voc_images(args.annotations), names)


def main(argv=None):
    args = parse_args(argv)
    from detr_cuda.data.validate import AnnotationFileError
    try:
        coco_dict = convert(args)
        folder = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(folder, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(coco_dict, handle)
    except (AnnotationFileError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = {key: len(coco_dict[key]) for key in ("images", "annotations", "categories")}
    print(f"wrote {args.output}: {counts['images']} images, {counts['annotations']} boxes, "
          f"{counts['categories']} categories", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
