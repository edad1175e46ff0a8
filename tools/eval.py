#!/usr/bin/env python
"""Evaluate a checkpoint with COCO bbox metrics and a per-class AP table.

    python tools/eval.py --config configs/deformable_detr.yaml --weights CHECKPOINT [key=value ...]
    torchrun --nproc_per_node=8 tools/eval.py --config ... --weights ...

--weights takes our checkpoints (EMA weights when the run kept them) or the
official Deformable DETR files. Writes eval.json and detections.json (COCO
results format, the dataset's own category ids) to --output-dir (default:
train.output_dir), and beside them per_class_ap.png and pr_curve.png (needs the
optional matplotlib: pip install matplotlib; skipped with a message without it,
or with --no-plots).
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
    parser.add_argument("--no-plots", action="store_true", help="do not draw per_class_ap.png / pr_curve.png")
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from detr_cuda.checkpoint import CheckpointError
    from detr_cuda.engine.evaluation_run import run_evaluation
    from detr_cuda.util.dist import DistributedSetupError
    output_dir = args.output_dir or config.train.output_dir
    try:
        run_evaluation(config, args.weights, output_dir, prefer_ema=not args.no_ema)
    except (FileNotFoundError, ValueError, CheckpointError, DistributedSetupError,
            PermissionError, NotADirectoryError, IsADirectoryError) as error:  # the last three: the output folder
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no evaluation written", file=sys.stderr)
        return 130
    if not args.no_plots and int(os.environ.get("RANK", "0")) == 0:
        write_plots(config, output_dir)
    return 0


def write_plots(config, output_dir):
    """Per-class AP bars and PR curves next to eval.json (rank 0, after the evaluation); with several
    validation sets, next to each one's val<k>/eval.json."""
    from detr_cuda.data.build import data_sources, synthetic_paths
    from detr_cuda.data.coco import coco_from_dict, read_annotations
    from detr_cuda.inference.eval_plots import write_eval_plots
    if config.data.dataset == "synthetic":
        sources, annotation_format = [synthetic_paths(config.data, "val")], "coco"
    else:
        sources, annotation_format = data_sources(config.data, "val"), config.data.format
    for index, (images, annotations) in enumerate(sources):
        folder = output_dir if len(sources) == 1 else os.path.join(output_dir, f"val{index}")
        ground_truth = coco_from_dict(read_annotations(annotations, images, annotation_format, "skip"))
        for path in write_eval_plots(os.path.join(folder, "eval.json"), coco_gt=ground_truth):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
