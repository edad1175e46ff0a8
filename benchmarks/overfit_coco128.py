#!/usr/bin/env python
"""Overfit a small Deformable DETR on 16 coco128 images on the CPU, once per MSDeformAttn backend.

Trains the same config from the same seed for a fixed number of steps with
the compiled ``cpu`` backend and with the pure-PyTorch ``reference`` backend,
then evaluates on the same 16 images, and prints steps/s and COCO AP side by
side (a markdown table; --record appends it to benchmarks/RESULTS.md).

    python benchmarks/overfit_coco128.py [--steps 300] [--images 16] [--size 160] [--coco128 PATH]

A backend that is not available (extension not built) is reported as such.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = [  # the demo's small from-scratch model, with two-stage + box refinement
    "model.backbone=resnet18", "model.backbone_width=16", "model.freeze_stem_and_layer1=false",
    "model.hidden_dim=64", "model.nheads=4", "model.enc_layers=2", "model.dec_layers=2",
    "model.dim_feedforward=256", "model.dropout=0.0", "model.num_queries=50", "model.num_feature_levels=3",
    "model.with_box_refine=true", "model.two_stage=true",
]


def write_subset(coco128, count, folder):
    with open(os.path.join(coco128, "annotations.json")) as handle:
        coco = json.load(handle)
    images = coco["images"][:count]
    ids = {image["id"] for image in images}
    subset = dict(coco, images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    path = os.path.join(folder, "subset.json")
    with open(path, "w") as handle:
        json.dump(subset, handle)
    return path


def run_backend(backend, args, annotations, folder):
    output = os.path.join(folder, backend)
    images = os.path.join(args.coco128, "images")
    command = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config",
               os.path.join(ROOT, "configs", "demo.yaml"), *MODEL, f"model.msda_backend={backend}",
               "data.dataset=coco", f"data.train_images={images}", f"data.train_annotations={annotations}",
               f"data.val_images={images}", f"data.val_annotations={annotations}",
               f"data.train_short_sides=[{args.size}]", f"data.train_max_size={args.size * 4 // 3}",
               f"data.val_short_side={args.size}", f"data.val_max_size={args.size * 4 // 3}",
               "data.horizontal_flip=false", "data.num_workers=0", "train.device=cpu",
               f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}", "train.epochs=100000",
               "train.lr_drop=100000", "train.eval_every=0", "train.log_interval=10", "train.seed=0",
               f"train.output_dir={output}"]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - started
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"backend": backend, "error": last}
    records = [json.loads(line) for line in open(os.path.join(output, "log.jsonl"))]
    intervals = [r for r in records if r["type"] == "train_interval"]
    step_seconds = sum(r["step_time"] * 10 for r in intervals)  # log_interval=10 steps per record
    metrics = json.load(open(os.path.join(output, "eval.json")))
    return {"backend": backend, "steps_per_s": len(intervals) * 10 / step_seconds, "AP": metrics["metrics"]["AP"],
            "AP50": metrics["metrics"]["AP50"], "final_loss": intervals[-1]["loss"], "wall_s": wall}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco128", default=os.path.join(ROOT, "..", "shared", "data", "coco128"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=160, help="shorter image side")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backends", default="cpu,reference")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.coco128, "annotations.json")):
        sys.exit(f"coco128 not found at {args.coco128} (pass --coco128 PATH)")
    with tempfile.TemporaryDirectory(prefix="overfit_coco128_") as folder:
        annotations = write_subset(args.coco128, args.images, folder)
        rows = [run_backend(backend, args, annotations, folder) for backend in args.backends.split(",")]
    header = (f"overfit {args.images} coco128 images, shorter side {args.size}, batch {args.batch_size}, "
              f"{args.steps} steps, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    lines = [f"### {header}", "", "| backend | steps/s | AP | AP50 | final loss | wall s |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['backend']} | unavailable: {row['error'][:80]} | | | | |")
        else:
            lines.append(f"| {row['backend']} | {row['steps_per_s']:.2f} | {row['AP']:.3f} | {row['AP50']:.3f} | "
                         f"{row['final_loss']:.3f} | {row['wall_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as handle:
            handle.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
