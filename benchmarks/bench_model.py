"""The whole Deformable DETR model, three ways:

  --mode train (default)  one training step = forward, criterion (matching, losses), backward (no
                          optimizer step): ms/image, images/s and peak memory for every
                          MSDeformAttn backend and precision side by side, each in its own
                          subprocess; with --baseline, the ORIGINAL Deformable DETR kernel swapped
                          in as the op of every MSDeformAttn layer of the same model ("original").
  --mode syncs            host syncs per step (benchmarks/host_syncs.py): an inference forward and
                          a training step (forward, criterion, backward), per kind (item, to_host,
                          data_dependent) and per call site. Exact counts: on a CPU they count what
                          would be a sync on a GPU.
  --mode infer            inference, batch 1 of a real image resized as evaluation does
                          (val_short_side 800 / val_max_size 1333: an 800x1333-like canvas),
                          ms/image and peak memory: our kernel, the reference op and, on the CPU,
                          our ONNX export under onnxruntime (exported by this process, so the
                          measured one never holds the torch model), each in its own subprocess;
                          "compiled" (not by default) is the cpu-kernel model under torch.compile
                          with frozen weights, compiled for this image size in the warm-up.

    python benchmarks/bench_model.py                         # GPU if present: R50, 2 images
                                                             # 800x1199 + 800x1333, fp32 and bf16
    python benchmarks/bench_model.py --device cuda --baseline PATH/MultiScaleDeformableAttention*.so
    python benchmarks/bench_model.py --device cpu            # small config, float32
    python benchmarks/bench_model.py --mode syncs --device cpu --variants deformable two_stage dn
    python benchmarks/bench_model.py --mode infer --device cpu
    python benchmarks/bench_model.py --mode infer --device cpu --backends cpu compiled onnx --warmup 2

Model presets: "published" (the default config: R50, 6+6 layers, hidden 256, 300 queries) and
"small" (ResNet-18, hidden 128, 2+2 layers, FFN 256, 100 queries). train and syncs use published
on a GPU and small on the CPU; infer uses published. --set adds config overrides, --sizes
replaces the image sizes (train, syncs) and --short-side / --max-size the resize (infer).

Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps (after a reset); on
the CPU the process's peak resident set during the timed steps (VmHWM, reset after warm-up
through /proc/self/clear_refs; where that is impossible, the whole process's ru_maxrss) and, in
infer mode, that peak minus the resident set before the timed runs ("working MiB"). Every
process runs with glibc's default malloc settings, as a user's would.
--baseline PATH imports an already built original extension by path; this script never builds
it (benchmarks/original_kernel.py says what it relies on).
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_infer import export_onnx_model, measure_infer, print_infer_table  # noqa: E402
from bench_setup import (NUM_CLASSES, PRESETS, VARIANTS, batch_sizes, build, describe_run,  # noqa: E402
                         device_name, make_batch, operator_for, parse_size, timed_runs)
from detr_cuda.engine.trainer import weighted_total  # noqa: E402
from detr_cuda.util.device import autocast_context  # noqa: E402
from detr_cuda.ops.functional import available_backends  # noqa: E402
from host_syncs import KINDS, HostSyncCounter, format_sites  # noqa: E402

MODES = ("train", "syncs", "infer")
# ------------------------------------------------------------ train mode

def measure_train(args, backend, amp):
    """One backend at one precision in this process: a result row."""
    device, variant = args.device, args.variants[0]
    model, criterion = build(args, variant, backend, device)
    model.train()
    sizes = batch_sizes(args)
    images, mask, targets = make_batch(sizes, NUM_CLASSES, device)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast_context(torch.device(device), amp):
            losses = criterion(model(images, mask, targets), targets)
        weighted_total(losses, criterion.weight_dict).backward()

    with operator_for(backend, args.baseline):
        times, peak_mib, _ = timed_runs(step, device, args.warmup, args.iterations)
    median = times[len(times) // 2]
    return {"mode": "train", "backend": backend, "amp": amp, "device": device, "variant": variant,
            "preset": args.preset, "batch": len(sizes), "sizes": sizes,
            "ms_per_image": 1000 * median / len(sizes), "images_per_s": len(sizes) / median,
            "min_ms_per_image": 1000 * times[0] / len(sizes), "peak_mib": peak_mib,
            "iterations": args.iterations, "threads": torch.get_num_threads()}


def print_train_table(args, rows):
    print(f"model fwd+criterion+bwd, {args.variants[0]}, device {args.device} ({device_name(args.device)}), "
          f"preset {args.preset}, extra overrides {list(args.set) or 'none'}, batch {len(batch_sizes(args))} of "
          f"{batch_sizes(args)}, {args.iterations} timed steps after {args.warmup}, torch {torch.__version__}, "
          f"threads {rows[0]['threads']}")
    print(f"{'backend':<10} {'amp':<5} {'ms/image (median)':>18} {'ms/image (min)':>15} {'images/s':>9} "
          f"{'peak MiB':>10} {'speed vs reference':>19} {'memory vs reference':>20} {'speed vs original':>18}")
    for row in rows:
        # Ratios against the reference backend and the original kernel at the same precision.
        reference = next((r for r in rows if r["backend"] == "reference" and r["amp"] == row["amp"]), None)
        original = next((r for r in rows if r["backend"] == "original" and r["amp"] == row["amp"]), None)
        speed = f"{reference['ms_per_image'] / row['ms_per_image']:.2f}x" if reference else "-"
        memory = f"{row['peak_mib'] / reference['peak_mib']:.2f}x" if reference else "-"
        versus = f"{original['ms_per_image'] / row['ms_per_image']:.2f}x" if original else "-"
        print(f"{row['backend']:<10} {row['amp']:<5} {row['ms_per_image']:>18.1f} {row['min_ms_per_image']:>15.1f} "
              f"{row['images_per_s']:>9.2f} {row['peak_mib']:>10.0f} {speed:>19} {memory:>20} {versus:>18}")


# ------------------------------------------------------------ syncs mode

def count_syncs(args, variant, backend):
    """Host syncs of one inference forward and one training step (after one untimed of each)."""
    device = args.device
    model, criterion = build(args, variant, backend, device)
    images, mask, targets = make_batch(batch_sizes(args), NUM_CLASSES, device)

    def inference():
        model.eval()
        with torch.no_grad():
            model(images, mask)

    def training(counter=None):
        phase = counter.phase if counter is not None else (lambda name: contextlib.nullcontext())
        model.train()
        model.zero_grad(set_to_none=True)
        with phase("forward"):
            outputs = model(images, mask, targets)
        with phase("criterion"):
            losses = criterion(outputs, targets)
            total = weighted_total(losses, criterion.weight_dict)
        with phase("backward"):
            total.backward()

    emulate = device == "cpu"
    with operator_for(backend, args.baseline):
        # One of each first, not counted (one-time work is no per-step cost), but watched, so that
        # the counters know what it left on the host.
        with HostSyncCounter(emulate=emulate) as warm_up:
            inference()
            training()
        with HostSyncCounter(emulate=emulate, residency_from=warm_up) as infer_counter:
            with infer_counter.phase("forward"):
                inference()
        with HostSyncCounter(emulate=emulate, residency_from=warm_up) as train_counter:
            training(train_counter)
    return infer_counter, train_counter


def run_syncs(args):
    backend = (args.backends or [available_backends(args.device)[0]])[0]
    emulated = "counted on the CPU as a GPU would sync (host_syncs.py)" if args.device == "cpu" else "real devices"
    print(f"host syncs per step, device {args.device} ({emulated}), MSDeformAttn backend {backend}, preset "
          f"{args.preset}, extra overrides {list(args.set) or 'none'}, batch {len(batch_sizes(args))} of "
          f"{batch_sizes(args)}, torch {torch.__version__}")
    print(f"{'variant':<12} {'scope':<10} {'phase':<10} " + " ".join(f"{k:>14}" for k in KINDS + ("total",)))
    rows, details = [], []
    for variant in args.variants:
        infer_counter, train_counter = count_syncs(args, variant, backend)
        for scope, counter, phases in (("inference", infer_counter, ("forward",)),
                                       ("train", train_counter, ("forward", "criterion", "backward"))):
            for phase in phases + ("all",):
                if phase == "all" and len(phases) == 1:
                    continue
                counts = counter.counts(None if phase == "all" else phase)
                total = sum(counts.values())
                print(f"{variant:<12} {scope:<10} {phase:<10} " + " ".join(f"{counts[k]:>14}" for k in counts)
                      + f" {total:>14}")
                rows.append({"mode": "syncs", "variant": variant, "scope": scope, "phase": phase,
                             "device": args.device, "backend": backend, "preset": args.preset, **counts,
                             "total": total})
            details.append((variant, scope, counter))
    for variant, scope, counter in details:
        print(f"\n{variant}, {scope}: call sites (count x kind [phase] innermost repository frames)")
        print("\n".join(format_sites(counter, limit=args.sites) or ["  none"]))
        rows.append({"mode": "syncs-sites", "variant": variant, "scope": scope,
                     "sites": [{"count": n, "phase": phase, "kind": kind, "site": site}
                               for n, phase, kind, site in counter.sites()]})
    return rows


# ------------------------------------------------------------ infer mode

# ------------------------------------------------------------------ main

def child_command(args, backend, amp):
    command = [sys.executable, os.path.abspath(__file__), "--mode", args.mode, "--single", backend,
               "--device", args.device, "--variants", args.variants[0], "--preset", args.preset,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--amp", amp, "--short-side", str(args.short_side), "--max-size", str(args.max_size)]
    if args.set:
        command += ["--set", *args.set]
    if args.sizes:
        command += ["--sizes", *[f"{h}x{w}" for h, w in args.sizes]]
    if args.baseline:
        command += ["--baseline", args.baseline]
    if args.image:
        command += ["--image", args.image]
    if backend == "onnx":
        command += ["--onnx-model", args.onnx_model]
    return command


def default_backends(args):
    backends = available_backends(args.device)
    if args.mode == "infer" and args.device == "cpu":
        backends = backends + ["onnx"]
    if args.baseline and args.device == "cuda":
        backends = backends + ["original"]  # the original kernel has no CPU kernel
    return backends


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="train")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", "--variant", nargs="+", choices=list(VARIANTS), default=None,
                        help="model variants (train and infer take the first; default deformable; syncs: "
                             "deformable two_stage dn)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model size (default: published on cuda and in infer mode, small on the cpu)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="HxW",
                        help="train/syncs image sizes, one per image of the batch (default: the preset's)")
    parser.add_argument("--backends", nargs="*",
                        help="default: every backend available on the device (+ onnx in CPU infer mode, + original "
                             "on cuda with --baseline); infer also takes compiled; syncs takes the first")
    parser.add_argument("--baseline", metavar="PATH",
                        help="an already built original Deformable DETR extension (.so), run as backend 'original'")
    parser.add_argument("--iterations", type=int, default=None, help="timed steps (default 10 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--amp", nargs="+", choices=["none", "bf16", "fp16"], default=None,
                        help="train precisions: none (float32) and/or autocast (default: none bf16 on cuda, none on "
                             "cpu)")
    parser.add_argument("--short-side", type=int, default=800, help="infer: evaluation resize short side")
    parser.add_argument("--max-size", type=int, default=1333, help="infer: evaluation resize long-side cap")
    parser.add_argument("--image", help="infer: image file (default: the coco128 image nearest 800x1333)")
    parser.add_argument("--sites", type=int, default=12, help="syncs: call sites listed per scope")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    parser.add_argument("--onnx-model", help=argparse.SUPPRESS)  # internal: the parent's export, for --single onnx
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    args.variants = args.variants or (["deformable", "two_stage", "dn"] if args.mode == "syncs" else ["deformable"])
    args.preset = args.preset or ("published" if args.device == "cuda" or args.mode == "infer" else "small")
    args.iterations = args.iterations or (10 if args.device == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.amp or (["none", "bf16"] if args.device == "cuda" else ["none"])

    if args.single:
        row = measure_infer(args, args.single) if args.mode == "infer" else measure_train(args, args.single,
                                                                                            precisions[0])
        print(json.dumps(row))
        return
    print(describe_run())
    failed = False
    if args.mode == "syncs":
        rows = run_syncs(args)
    else:
        backends = args.backends or default_backends(args)
        if args.mode == "infer" and "onnx" in backends:
            args.onnx_model = export_onnx_model(args, tempfile.mkdtemp(prefix="bench_model_"))
        rows = []
        for amp in (precisions if args.mode == "train" else ["none"]):
            for backend in backends:
                result = subprocess.run(child_command(args, backend, amp), capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{backend} amp={amp}: failed\n{result.stderr[-3000:]}", file=sys.stderr)
                    failed = True
                    continue
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                # Each row as it comes, so that a run stopped by a time limit still shows it.
                print(f"# {backend} amp={amp}: {rows[-1]['ms_per_image']:.1f} ms/image, "
                      f"peak {rows[-1]['peak_mib']:.0f} MiB", flush=True)
        if not rows:
            sys.exit("no backend ran")
        (print_infer_table if args.mode == "infer" else print_train_table)(args, rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    if failed:
        sys.exit("some backends failed (above); their rows are missing")


if __name__ == "__main__":
    main()
