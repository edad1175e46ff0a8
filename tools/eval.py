#!/usr/bin/env python
"""Evaluate a checkpoint with COCO bbox metrics and a per-class AP table.

    python tools/eval.py --config configs/deformable_detr.yaml --weights CHECKPOINT [key=value ...]
    torchrun --nproc_per_node=8 tools/eval.py --config ... --weights ...

--weights takes our checkpoints (EMA weights when the run kept them) or the
official Deformable DETR files. Writes eval.json and detections_*.json (COCO
results format, the dataset's own category ids) to --output-dir (default:
train.output_dir).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_cuda.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file the model was trained with")
    parser.add_argument("--weights", required=True, metavar="PATH", help="checkpoint to evaluate")
    parser.add_argument("--output-dir", "--output_dir", help="where eval.json goes (default: train.output_dir)")
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if EMA weights exist")
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from detr_cuda.engine.evaluation_run import run_evaluation
    output_dir = args.output_dir or config.train.output_dir
    try:
        run_evaluation(config, args.weights, output_dir, prefer_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
