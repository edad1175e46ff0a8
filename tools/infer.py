#!/usr/bin/env python
"""Detect objects in image files with a trained checkpoint; write COCO results and drawn pictures.

    python tools/infer.py --checkpoint outputs/run/checkpoint_best.pth --input photos/ --output-dir out/
    python tools/infer.py --checkpoint r50_deformable_detr-checkpoint.pth \\
        --config configs/deformable_detr.yaml --input 'data/**/*.jpg' --score-threshold 0.5

--input: image files, folders (their image files) or glob patterns (quote them), any mix.
--checkpoint: ours (holds its config and category map) or an official Deformable DETR file
(needs --config; its 91 logits are COCO category ids). Writes OUTPUT_DIR/results.json
(COCO results: image_id, category_id, category_name, bbox xywh, score, file_name) and
OUTPUT_DIR/images/ (boxes scoring >= --score-threshold with class names and scores).
file_name: the path relative to the folder holding all inputs (the bare name for one input
folder; dupA/x.jpg and dupB/x.jpg for two). Pictures keep bare names, made unique on a clash.
Image ids: the file name's number when the names of all files that were read are numbers (COCO
names; a skipped file does not renumber the others), else 1..N.
Files that cannot be read or processed are reported by path with their error and skipped;
results.json holds the others. The last lines say how many boxes scored >= --score-threshold and,
for pictures with none, the best score there was.

The same in Python (the API this tool is built on):

    detector = detr_cuda.Detector.from_checkpoint("outputs/run/checkpoint_best.pth")
    detector.predict(["a.jpg", "b.jpg"], score_threshold=0.5)   # per image: boxes, scores, labels, names
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_cuda.config import ConfigError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--weights", required=True, help="checkpoint file (ours or official)")
    parser.add_argument("--input", required=True, nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="where results.json and images/ go")
    parser.add_argument("--config", help="YAML config (required when the checkpoint holds none)")
    parser.add_argument("--annotations", help="instances JSON whose categories name the labels (overrides the "
                                              "checkpoint's map)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--score-threshold", type=float, default=0.3, help="boxes drawn from this score")
    parser.add_argument("--json-score-threshold", type=float, default=0.0,
                        help="detections written to results.json from this score (top-k is eval.num_select)")
    parser.add_argument("--image-format", choices=("png", "jpg"), help="pictures' format (default: as the input)")
    parser.add_argument("--no-draw", action="store_true", help="write results.json only")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights exist")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. data.val_short_side=600 eval.num_select=50")
    return parser.parse_args(argv)


def split_overrides(inputs, overrides):
    """--input takes several values, so trailing ``section.field=value`` overrides land in it;
    move the ones that are not existing paths back to the overrides."""
    pattern = re.compile(r"^[A-Za-z_]+\.[A-Za-z_.]+=")
    moved = [item for item in inputs if pattern.match(item) and not os.path.exists(item)]
    return [item for item in inputs if item not in moved], moved + list(overrides)


def main(argv=None):
    args = parse_args(argv)
    args.input, args.overrides = split_overrides(args.input, args.overrides)
    from detr_cuda import Detector
    from detr_cuda.inference import list_images, run_inference
    try:
        paths = list_images(args.input)
        detector = Detector.from_checkpoint(args.checkpoint, args.config, args.device, args.overrides,
                                            args.annotations, prefer_ema=not args.no_ema)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:  # CheckpointError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(paths)} input file(s); model on {detector.device}, {detector.category_map.num_labels} classes",
          file=sys.stderr)
    report = run_inference(detector, paths, args.output_dir, batch_size=args.batch_size,
                           score_threshold=args.score_threshold, json_score_threshold=args.json_score_threshold,
                           draw=not args.no_draw, image_format=args.image_format)
    done = len(paths) - len(report["skipped"])
    print(f"{done} image(s) processed, {len(report['results'])} detections -> "
          f"{os.path.join(args.output_dir, 'results.json')}"
          + (f", pictures in {os.path.join(args.output_dir, 'images')}" if not args.no_draw else ""), file=sys.stderr)
    report_scores(report, args.score_threshold)
    if report["skipped"]:
        print(f"{len(report['skipped'])} file(s) skipped (unreadable, or failed in resizing or the model):",
              file=sys.stderr)
        for path, reason in report["skipped"]:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0 if done else 1


def report_scores(report, score_threshold, shown=10):
    """Says how many boxes scored >= the threshold and, for the pictures with none, the best score
    they had (a weak model or a high threshold otherwise just leaves the pictures blank)."""
    print(f"{report['boxes_above_threshold']} detection(s) scored >= {score_threshold:g} (--score-threshold)",
          file=sys.stderr)
    empty = report["empty"]
    if not empty:
        return
    best = [f"{os.path.basename(path)} {'-' if score is None else f'{score:.3f}'}" for path, score in empty[:shown]]
    more = f", ... ({len(empty)} in all)" if len(empty) > shown else ""
    print(f"{len(empty)} image(s) with no detection >= {score_threshold:g}; their best scores: {', '.join(best)}{more}. "
          "Lower --score-threshold to see weaker detections.", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
