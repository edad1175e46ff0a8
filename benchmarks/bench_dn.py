"""DN off vs DN on vs contrastive DN vs DINO: COCO AP after the same number of training steps.

Trains the same tiny anchor-query Deformable DETR (configs/demo.yaml with
model.query_type=anchor, box refinement and two-stage on) from the same seed on
the built-in generated dataset, for the same number of optimizer steps and the
same batches, and prints the COCO bbox AP (pycocotools) of each on held-out
generated images. DN's claim is faster convergence, so the table is what we
expect to move. The DINO row is the contrastive-DN run with DINO's own pieces
on top (model.query_type=dino: proposals ranked by their best class with a
class-aware encoder loss, look forward twice, the decoder's final norm, one
head pair shared by the layers; DINO's position encoding); everything else,
DN settings and loss weights included, is the same as in the other rows.

    python benchmarks/bench_dn.py --steps 300            # CPU, a few minutes per run
    python benchmarks/bench_dn.py --device cuda --steps 2000 --image-size 256

Extra ``section.field=value`` arguments override the config of every run.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detr_cuda.config import apply_override, load_config, parse_override  # noqa: E402
from detr_cuda.data import build_dataloader, build_dataset  # noqa: E402
from detr_cuda.engine.evaluate import evaluate  # noqa: E402
from detr_cuda.engine.optim import build_optimizer  # noqa: E402
from detr_cuda.engine.trainer import weighted_total  # noqa: E402
from detr_cuda.util.device import move_to_device  # noqa: E402
from detr_cuda.models import build_model  # noqa: E402

VARIANTS = {
    "DN off": ["dn.enabled=false"],
    "DN on": ["dn.enabled=true"],
    "contrastive DN": ["dn.enabled=true", "dn.contrastive=true"],
    "DINO": ["dn.enabled=true", "dn.contrastive=true", "model.query_type=dino", "model.position_temperature=20",
             "model.position_offset=0"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96, help="generated image size (train and val)")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--data-dir", default=None, help="where the generated sets go (default: a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny ops: 1 beats oversubscribing a busy machine)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: "
                        + ", ".join(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="section.field=value applied to every run")
    return parser.parse_args()


def base_config(args, data_dir):
    size = args.image_size
    overrides = [
        "model.query_type=anchor", "model.with_box_refine=true",
        "data.dataset=synthetic", f"data.synthetic_dir={data_dir}",
        f"data.synthetic_train_images={args.train_images}", f"data.synthetic_val_images={args.val_images}",
        f"data.synthetic_image_size={size}", f"data.train_short_sides=[{size}]", f"data.train_max_size={size}",
        f"data.val_short_side={size}", f"data.val_max_size={size}", "data.num_workers=0",
        f"train.batch_size={args.batch_size}", f"train.seed={args.seed}",
    ] + list(args.overrides)
    return load_config(args.config, overrides)


def train_and_evaluate(cfg, variant_overrides, train_set, val_set, steps, device, seed, output_dir):
    for text in variant_overrides:
        apply_override(cfg, *parse_override(text))
    torch.manual_seed(seed)
    model, criterion, postprocessor = build_model(cfg, train_set.num_classes)
    model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    loader = build_dataloader(train_set, cfg.train.batch_size, train=True, seed=seed)
    model.train()
    started, step, epoch, losses = time.time(), 0, 0, []
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for images, masks, targets in loader:
            images, masks, targets = move_to_device(images, masks, targets, device)
            loss_dict = criterion(model(images, masks, targets), targets)
            loss = weighted_total(loss_dict, criterion.weight_dict)
            optimizer.zero_grad()
            loss.backward()
            if cfg.train.clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_max_norm)
            optimizer.step()
            matching = weighted_total({k: v for k, v in loss_dict.items() if not k.startswith("loss_dn")},
                                      criterion.weight_dict)
            losses.append(matching.item())
            step += 1
            if step >= steps:
                break
        epoch += 1
    train_seconds = time.time() - started
    val_loader = build_dataloader(val_set, cfg.eval.batch_size, train=False)
    metrics = evaluate(model, postprocessor, val_loader, val_set, device, cfg, output_dir,
                       log=lambda *a: None)["metrics"]
    tail = losses[-20:]
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"],
            "matching_loss": sum(tail) / len(tail), "seconds": train_seconds}


def main():
    args = parse_args()
    names = [name.strip() for name in args.variants.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or os.path.join(scratch, "synthetic")
        cfg = base_config(args, data_dir)
        train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
        print(f"generated set: {len(train_set)} train / {len(val_set)} held-out images, {args.image_size}px, "
              f"{train_set.num_classes} classes; {args.steps} steps x batch {args.batch_size} per run on {device}; "
              f"model: {args.config} + query_type=anchor (DINO row: dino), box refine"
              + (f", overrides {args.overrides}" if args.overrides else ""))
        rows = []
        for name in names:
            result = train_and_evaluate(base_config(args, data_dir), VARIANTS[name], train_set, val_set,
                                        args.steps, device, args.seed, os.path.join(scratch, name.replace(" ", "_")))
            rows.append((name, result))
            print(f"  {name}: AP {result['AP']:.3f} ({result['seconds']:.0f}s)", flush=True)
    print()
    print("| variant | steps | AP | AP50 | AP75 | matching loss (last 20 steps) | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {args.steps} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | {100 * r['AP75']:.1f} | "
              f"{r['matching_loss']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
