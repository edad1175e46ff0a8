"""Forward+backward time per image, images/s and peak memory of the full Deformable DETR
model, for every available MSDeformAttn backend and precision, side by side.

    python benchmarks/bench_model.py                 # GPU if present: R50, 800x1333-like batch,
                                                     # float32 and bfloat16 autocast
    python benchmarks/bench_model.py --device cpu    # small config on the CPU, float32

Each backend runs in its own subprocess. Peak memory covers the timed steps
only: on CUDA torch.cuda.max_memory_allocated after a reset, on the CPU the
process's peak RSS (VmHWM, reset after warm-up through /proc/self/clear_refs;
where that is impossible, the whole process's ru_maxrss). One step = forward, criterion, backward
(no optimizer step). Prints a table; --json writes the rows too.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detr_cuda.config import load_config  # noqa: E402
from detr_cuda.engine.trainer import weighted_total  # noqa: E402
from detr_cuda.models import build_model  # noqa: E402
from detr_cuda.util.device import autocast_context  # noqa: E402
from detr_cuda.ops.functional import available_backends  # noqa: E402

VARIANTS = {
    "deformable": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
    "single_scale": ["model.num_feature_levels=1"],
}
# Published R50 model on 800x1333-like images (GPU); a small model on small images (CPU).
PRESETS = {
    "cuda": {"overrides": [], "sizes": [(800, 1199), (800, 1333)]},
    "cpu": {"overrides": ["model.backbone=resnet18", "model.hidden_dim=128", "model.enc_layers=2",
                          "model.dec_layers=2", "model.dim_feedforward=256", "model.num_queries=100"],
            "sizes": [(320, 416), (288, 448)]},
}


def make_batch(sizes, num_classes, device):
    generator = torch.Generator().manual_seed(0)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    targets = []
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        mask[i, :h, :w] = False
        n = 8
        boxes = torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                           torch.rand(n, 2, generator=generator) * 0.3 + 0.05], 1)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator).to(device),
                        "boxes": boxes.to(device)})
    return images.to(device), mask.to(device), targets


def reset_cpu_peak():
    """Resets the process's peak RSS (Linux: VmHWM via /proc/self/clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def cpu_peak_mib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def measure(backend, device, variant, iterations, warmup, threads, amp="none"):
    """Runs one backend at one precision (``amp`` as train.amp: none, bf16, fp16) in this
    process; returns a result row."""
    if threads:
        torch.set_num_threads(threads)
    preset = PRESETS[device]
    cfg = load_config(None, preset["overrides"] + VARIANTS[variant])
    torch.manual_seed(0)
    cfg.model.msda_backend = backend
    model, criterion, _ = build_model(cfg, num_classes=91)
    model.to(device).train()
    images, mask, targets = make_batch(preset["sizes"], 91, device)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast_context(torch.device(device), amp):
            losses = criterion(model(images, mask), targets)
        weighted_total(losses, criterion.weight_dict).backward()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        cpu_peak_reset = reset_cpu_peak()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mib = cpu_peak_mib() if cpu_peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backend": backend, "amp": amp, "device": device, "variant": variant, "batch": len(preset["sizes"]),
            "sizes": preset["sizes"], "ms_per_image": 1000 * median / len(preset["sizes"]),
            "images_per_s": len(preset["sizes"]) / median,
            "min_ms_per_image": 1000 * times[0] / len(preset["sizes"]), "peak_mib": peak_mib,
            "iterations": iterations, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=list(VARIANTS), default="deformable")
    parser.add_argument("--backends", nargs="*", help="default: every backend available on the device")
    parser.add_argument("--iterations", type=int, default=None, help="timed steps (default 10 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--amp", nargs="+", choices=["none", "bf16", "fp16"], default=None,
                        help="precisions: none (float32) and/or autocast (default: none bf16 on cuda, none on cpu)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    iterations = args.iterations or (10 if args.device == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    precisions = args.amp or (["none", "bf16"] if args.device == "cuda" else ["none"])
    if args.single:
        print(json.dumps(measure(args.single, args.device, args.variant, iterations, warmup, args.threads,
                                 precisions[0])))
        return
    backends = args.backends or available_backends(args.device)
    rows = []
    for amp in precisions:
        for backend in backends:
            command = [sys.executable, os.path.abspath(__file__), "--single", backend, "--device", args.device,
                       "--variant", args.variant, "--iterations", str(iterations), "--warmup", str(warmup),
                       "--threads", str(args.threads), "--amp", amp]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{backend} amp={amp}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    if not rows:
        sys.exit("no backend ran")
    preset = PRESETS[args.device]
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"model fwd+bwd, {args.variant}, device {args.device} ({name}), batch {len(preset['sizes'])} of "
          f"{preset['sizes']}, config overrides {preset['overrides'] or 'none (published R50)'}, "
          f"{iterations} timed steps, torch {torch.__version__}, threads {rows[0]['threads']}")
    print(f"{'backend':<10} {'amp':<5} {'ms/image (median)':>18} {'ms/image (min)':>15} {'images/s':>9} "
          f"{'peak MiB':>10} {'speed vs reference':>19} {'memory vs reference':>20}")
    for row in rows:
        # Ratios against the reference backend at the same precision.
        reference = next((r for r in rows if r["backend"] == "reference" and r["amp"] == row["amp"]), None)
        speed = f"{reference['ms_per_image'] / row['ms_per_image']:.2f}x" if reference else "-"
        memory = f"{row['peak_mib'] / reference['peak_mib']:.2f}x" if reference else "-"
        print(f"{row['backend']:<10} {row['amp']:<5} {row['ms_per_image']:>18.1f} {row['min_ms_per_image']:>15.1f} "
              f"{row['images_per_s']:>9.2f} {row['peak_mib']:>10.0f} {speed:>19} {memory:>20}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
