"""Where a CPU training step and an inference forward spend their time: torch.profiler's top
operators by self CPU time, one table per variant.

    python benchmarks/profile_step.py                                  # 3 variants, train, short side 320
    python benchmarks/profile_step.py --variants dn --short-side 512
    python benchmarks/profile_step.py --infer                          # inference forward, 800x1333

Training step: the shipped recipe of each variant (configs/: R50, 6+6 layers, 300 queries; the DN
recipe has FFN 2048 and no dropout, as DN-DETR's; random weights, seed 0) on a batch of the first --batch coco128 images, resized as evaluation resizes (short side --short-side,
long side at most --short-side * 1333 / 800), with their real boxes; forward, matching and losses,
backward, gradient clipping and AdamW, as the training loop runs them (engine/trainer.py), after
--warmup untimed steps. Inference: batch 1, the coco128 image nearest 800x1333 (bench_model.py
--mode infer's image), torch.no_grad.

Self CPU time is the time inside an operator minus its children; shares are of the sum over all
operators. Under machine load the absolute times inflate; the shares move much less (ops are timed
on the calling thread, so a descheduled thread inflates every op alike, roughly).
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_infer import coco128_dir, load_image  # noqa: E402
from bench_setup import NUM_CLASSES, describe_run  # noqa: E402
from detr_cuda.config import load_config  # noqa: E402
from detr_cuda.models import build_model  # noqa: E402
from detr_cuda.data.coco import CocoDetection  # noqa: E402
from detr_cuda.data.loader import collate_fn  # noqa: E402
from detr_cuda.data.transforms import build_transforms  # noqa: E402
from detr_cuda.engine.optim import build_optimizer  # noqa: E402
from detr_cuda.engine.trainer import weighted_total  # noqa: E402

PHASES = ("forward", "criterion", "backward", "optimizer")
RECIPES = {"deformable": "deformable_detr.yaml", "two_stage": "deformable_detr_two_stage.yaml",
           "dn": "deformable_detr_refine_dn.yaml"}


def build(args, variant):
    """(config, model, criterion) of ``variant``'s recipe, every MSDeformAttn layer on args.backend."""
    cfg = load_config(os.path.join(ROOT, "configs", RECIPES[variant]),
                      [f"model.msda_backend={args.backend}"] + list(args.set))
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, num_classes=NUM_CLASSES)
    return cfg, model, criterion


def coco128_batch(short_side, count):
    """(images (B, 3, H, W), padding_mask (B, H, W), targets) of the first ``count`` coco128
    images, resized as evaluation resizes at ``short_side`` (long side capped at 1333/800 of it)."""
    folder = coco128_dir()
    if folder is None:
        raise SystemExit("coco128 not found: set DETR_CUDA_COCO128 to the folder with annotations.json")
    cfg = load_config(None, [f"data.val_short_side={short_side}",
                             f"data.val_max_size={round(short_side * 1333 / 800)}"])
    dataset = CocoDetection(os.path.join(folder, "images"), os.path.join(folder, "annotations.json"),
                            build_transforms(cfg.data, train=False))
    return collate_fn([dataset[index] for index in range(count)])


def training_step(args, variant):
    """A function running one training step of ``variant`` (phases labelled for the profiler)."""
    cfg, model, criterion = build(args, variant)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    parameters = [p for p in model.parameters() if p.requires_grad]
    images, mask, targets = coco128_batch(args.short_side, args.batch)

    def step():
        with record_function("forward"):
            outputs = model(images, mask, targets)
        with record_function("criterion"):
            total = weighted_total(criterion(outputs, targets), criterion.weight_dict)
        with record_function("backward"):
            total.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(parameters, cfg.train.clip_max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step, f"batch {tuple(images.shape)}"


def inference_forward(args, variant):
    images, mask, description = load_image(args)
    _, model, _ = build(args, variant)
    model.eval()

    def forward():
        with torch.no_grad(), record_function("forward"):
            model(images, mask)
    return forward, description


def print_table(title, events, top):
    """Top operators by self CPU time, and the phases' total times (record_function labels)."""
    operators = [e for e in events if e.key not in PHASES]
    total_us = sum(e.self_cpu_time_total for e in operators)
    print(f"\n{title}: total self CPU {total_us / 1e3:.0f} ms")
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    if phases:
        print("phases: " + ", ".join(f"{name} {phases[name] / 1e3:.0f} ms" for name in PHASES if name in phases))
    print("| operator | self CPU ms | share | calls |\n|---|---|---|---|")
    for event in sorted(operators, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"| `{event.key}` | {event.self_cpu_time_total / 1e3:.1f} | "
              f"{100 * event.self_cpu_time_total / total_us:.1f}% | {event.count} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--infer", action="store_true", help="profile an inference forward instead of a step")
    parser.add_argument("--short-side", type=int, default=None,
                        help="resize short side (default 320 for a step, 800 for --infer)")
    parser.add_argument("--max-size", type=int, default=1333, help="--infer: long-side cap")
    parser.add_argument("--batch", type=int, default=2, help="training step: images per batch")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "reference"], help="MSDeformAttn backend")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    args.short_side = args.short_side or (800 if args.infer else 320)
    args.image = None  # what bench_model.load_image reads: the coco128 image nearest the size
    torch.set_num_threads(args.threads)
    print(describe_run())
    for variant in args.variants:
        run, what = (inference_forward if args.infer else training_step)(args, variant)
        for _ in range(args.warmup):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            run()
        scope = "inference forward" if args.infer else f"training step (short side {args.short_side})"
        print_table(f"{variant}, {scope}, {what}, backend {args.backend}, {args.threads} threads, "
                    f"torch {torch.__version__}", profiler.key_averages(), args.top)


if __name__ == "__main__":
    main()
