#!/usr/bin/env python
"""Pictures of what a checkpoint does.

Ground truth and predictions side by side for images of a COCO-format dataset:

    python tools/visualize.py compare --checkpoint CKPT --images val2017/ \\
        --annotations instances_val2017.json --output-dir vis/ [--num-images 8 | --image-ids 139 285] \\
        [--image-format png]

Sampling points of the deformable cross-attention of the last decoder layer for one query
(one colour per feature level, dot size by attention weight; default query: the one with the
best-scoring detection; the white box is that query's prediction, the white cross its
reference point):

    python tools/visualize.py attention --checkpoint CKPT --image photo.jpg --output-dir vis/ [--query 17]

Official Deformable DETR checkpoints need --config, as in tools/infer.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_cuda.config import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", "--weights", required=True)
    common.add_argument("--config", help="YAML config (required when the checkpoint holds none)")
    common.add_argument("--output-dir", "--output_dir", required=True)
    common.add_argument("--device", default="auto")
    common.add_argument("overrides", nargs="*", metavar="section.field=value")
    compare = modes.add_parser("compare", parents=[common], help="ground truth | predictions for dataset images")
    compare.add_argument("--images", required=True, help="image folder of the dataset")
    compare.add_argument("--annotations", required=True, help="instances JSON of the dataset")
    compare.add_argument("--num-images", type=int, default=8)
    compare.add_argument("--image-ids", type=int, nargs="+", help="these image ids instead of the first N")
    compare.add_argument("--score-threshold", type=float, default=0.3)
    compare.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="pictures' format")
    attention = modes.add_parser("attention", parents=[common], help="sampling points of one decoder query")
    attention.add_argument("--image", required=True, help="image file")
    attention.add_argument("--query", type=int, help="query index (default: the best-scoring one)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from detr_cuda.inference import Detector
    from detr_cuda.inference import read_image
    from detr_cuda.inference.visualize import render_attention, write_ground_truth_vs_predictions
    try:
        # Predictions are named by the checkpoint's own category map, ground truth by the dataset's.
        detector = Detector.from_checkpoint(args.checkpoint, args.config, args.device, args.overrides)
        if args.mode == "compare":
            written = write_ground_truth_vs_predictions(detector, args.images, args.annotations, args.output_dir,
                                                        args.num_images, args.image_ids, args.score_threshold,
                                                        args.image_format)
            print(f"wrote {len(written)} picture(s) to {args.output_dir}", file=sys.stderr)
            return 0
        try:
            image = read_image(args.image)
        except Exception as error:
            raise ValueError(f"cannot read image {args.image}: {type(error).__name__}: {error}") from error
        picture, info = render_attention(detector, image, args.query)
        os.makedirs(args.output_dir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(args.image))[0]
        path = os.path.join(args.output_dir, f"{stem}_query{info['query']}_sampling.png")
        picture.save(path)
        inside = sum(int(((p[:, 0] >= 0) & (p[:, 0] < image.width) & (p[:, 1] >= 0) & (p[:, 1] < image.height)).sum())
                     for p in info["points"])
        total = sum(len(p) for p in info["points"])
        print(f"query {info['query']} ({detector.category_map.class_names[info['label']]} {info['score']:.2f}): "
              f"{total} sampling points over {len(info['points'])} levels, {inside} inside the image -> {path}",
              file=sys.stderr)
        return 0
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:  # CheckpointError included
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
