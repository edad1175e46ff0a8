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
                          our ONNX export under onnxruntime, each in its own subprocess.

    python benchmarks/bench_model.py                         # GPU if present: R50, 2 images
                                                             # 800x1199 + 800x1333, fp32 and bf16
    python benchmarks/bench_model.py --device cuda --baseline PATH/MultiScaleDeformableAttention*.so
    python benchmarks/bench_model.py --device cpu            # small config, float32
    python benchmarks/bench_model.py --mode syncs --device cpu --variants deformable two_stage dn
    python benchmarks/bench_model.py --mode infer --device cpu

Model presets: "published" (the default config: R50, 6+6 layers, hidden 256, 300 queries) and
"small" (ResNet-18, hidden 128, 2+2 layers, FFN 256, 100 queries). train and syncs use published
on a GPU and small on the CPU; infer uses published. --set adds config overrides, --sizes
replaces the image sizes (train, syncs) and --short-side / --max-size the resize (infer).

Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps (after a reset); on
the CPU the process's peak resident set during the timed steps (VmHWM, reset after warm-up
through /proc/self/clear_refs; where that is impossible, the whole process's ru_maxrss) and, in
infer mode, that peak minus the resident set before the timed runs ("working MiB").
--baseline PATH imports an already built original extension by path; this script never builds
it (benchmarks/original_kernel.py says what it relies on).
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from detr_cuda.config import load_config  # noqa: E402
from detr_cuda.models import build_model  # noqa: E402
from detr_cuda.ops import MSDeformAttn  # noqa: E402
from detr_cuda.ops.functional import available_backends  # noqa: E402
from host_syncs import KINDS, HostSyncCounter, format_sites  # noqa: E402
from original_kernel import check_calls, load_original, original_kernel_in_layers  # noqa: E402

VARIANTS = {
    "deformable": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
    "single_scale": ["model.num_feature_levels=1"],
    # DN-DAB-Deformable-DETR: anchor queries, box refinement, denoising queries in training.
    "dn": ["model.with_box_refine=true", "model.query_type=anchor", "dn.enabled=true"],
}
PRESETS = {
    "published": {"overrides": [], "sizes": [(800, 1199), (800, 1333)]},
    "small": {"overrides": ["model.backbone=resnet18", "model.hidden_dim=128", "model.enc_layers=2",
                            "model.dec_layers=2", "model.dim_feedforward=256", "model.num_queries=100"],
              "sizes": [(320, 416), (288, 448)]},
}
MODES = ("train", "syncs", "infer")
NUM_CLASSES = 91


# ----------------------------------------------------------------- set-up

def autocast(device, amp):
    """torch.autocast for amp in none / bf16 / fp16 (train.amp's values)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def total_loss(losses, weight_dict):
    """The training loss: sum of the weighted terms (as the training loop weights them)."""
    return sum(losses[name] * weight for name, weight in weight_dict.items() if name in losses)


def parse_size(text):
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def model_config(args, variant):
    preset = PRESETS[args.preset]
    return load_config(None, preset["overrides"] + VARIANTS[variant] + list(args.set))


def batch_sizes(args):
    return args.sizes or PRESETS[args.preset]["sizes"]


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


def build(args, variant, backend, device):
    """(model, criterion) on ``device`` with every MSDeformAttn layer on ``backend`` (our backends)."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(model_config(args, variant), num_classes=NUM_CLASSES)
    model.to(device)
    if backend not in ("original", "onnx"):
        for layer in model.modules():
            if isinstance(layer, MSDeformAttn):
                layer.backend = backend
    return model, criterion


@contextlib.contextmanager
def operator_for(backend, baseline_path):
    """The original kernel in every layer for backend "original"; nothing otherwise."""
    if backend != "original":
        yield None
        return
    if not baseline_path:
        raise SystemExit("backend 'original' needs --baseline PATH")
    with original_kernel_in_layers(load_original(baseline_path)) as counter:
        yield counter
        check_calls(counter)


# ---------------------------------------------------------------- memory

def reset_cpu_peak():
    """Resets the process's peak RSS (Linux: VmHWM via /proc/self/clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def status_mib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak_mib(reset_worked):
    return status_mib("VmHWM") if reset_worked else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


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
        with autocast(device, amp):
            losses = criterion(model(images, mask, targets), targets)
        total_loss(losses, criterion.weight_dict).backward()

    with operator_for(backend, args.baseline):
        for _ in range(args.warmup):
            step()
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_worked = reset_cpu_peak()
        times = []
        for _ in range(args.iterations):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else cpu_peak_mib(reset_worked)
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
            total = total_loss(losses, criterion.weight_dict)
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

def coco128_dir():
    candidates = [os.environ.get("DETR_CUDA_COCO128"), os.path.join(ROOT, "..", "shared", "data", "coco128"),
                  os.path.join(ROOT, "..", "..", "shared", "data", "coco128")]
    return next((os.path.abspath(p) for p in candidates
                 if p and os.path.isfile(os.path.join(p, "annotations.json"))), None)


def pick_image(args):
    """Path of the image to run: --image, else the coco128 image whose evaluation size comes
    closest to short_side x max_size (widest first), else None (random pixels)."""
    if args.image:
        return args.image
    folder = coco128_dir()
    if folder is None:
        return None
    from detr_cuda.data.transforms import resized_size
    with open(os.path.join(folder, "annotations.json")) as handle:
        images = json.load(handle)["images"]

    def distance(entry):
        height, width = resized_size((entry["width"], entry["height"]), args.short_side, args.max_size)
        return abs(height - args.short_side) + abs(width - args.max_size), entry["file_name"]
    path = os.path.join(folder, "images", min(images, key=distance)["file_name"])
    return path if os.path.isfile(path) else None


def load_image(args):
    """(images (1, 3, H, W), padding_mask (1, H, W), description)."""
    path = pick_image(args)
    if path is None:
        generator = torch.Generator().manual_seed(0)
        image = torch.randn(1, 3, args.short_side, args.max_size, generator=generator)
        return image, torch.zeros(1, args.short_side, args.max_size, dtype=torch.bool), \
            f"random {args.short_side}x{args.max_size} (no coco128 image found)"
    from PIL import Image, ImageOps
    from detr_cuda.data.transforms import build_transforms
    cfg = load_config(None, [f"data.val_short_side={args.short_side}", f"data.val_max_size={args.max_size}"])
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "size": torch.tensor([image.height, image.width])}
    tensor, _ = build_transforms(cfg.data, train=False)(image, target)
    height, width = tensor.shape[-2:]
    return tensor[None], torch.zeros(1, height, width, dtype=torch.bool), \
        f"{os.path.basename(path)} {image.height}x{image.width} resized to {height}x{width}"


def measure_infer(args, backend):
    device, variant = args.device, args.variants[0]
    images, mask, description = load_image(args)
    images, mask = images.to(device), mask.to(device)
    model, _ = build(args, variant, "reference" if backend == "onnx" else backend, device)
    model.eval()
    if backend == "onnx":
        import onnxruntime
        from detr_cuda.inference.export import export_onnx
        path = os.path.join(tempfile.mkdtemp(prefix="bench_model_"), "model.onnx")
        export_onnx(model, path, images.shape[-2], images.shape[-1])
        del model  # only onnxruntime's copy of the weights stays resident
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feeds = {"images": images.numpy(), "padding_mask": mask.numpy()}

        def forward():
            session.run(["pred_logits", "pred_boxes"], feeds)
    else:
        def forward():
            with torch.no_grad():
                model(images, mask)

    with operator_for(backend, args.baseline):
        for _ in range(args.warmup):
            forward()
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2 ** 20
        else:
            reset_worked = reset_cpu_peak()
            before = status_mib("VmRSS")
        times = []
        for _ in range(args.iterations):
            start = time.perf_counter()
            forward()
            synchronize(device)
            times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else cpu_peak_mib(reset_worked)
    return {"mode": "infer", "backend": backend, "device": device, "variant": variant, "preset": args.preset,
            "image": description, "height": int(images.shape[-2]), "width": int(images.shape[-1]),
            "ms_per_image": 1000 * times[len(times) // 2], "min_ms_per_image": 1000 * times[0],
            "peak_mib": peak, "working_mib": peak - before, "iterations": args.iterations,
            "threads": torch.get_num_threads()}


def print_infer_table(args, rows):
    print(f"inference, batch 1, {args.variants[0]}, device {args.device} ({device_name(args.device)}), preset "
          f"{args.preset}, extra overrides {list(args.set) or 'none'}, image {rows[0]['image']}, "
          f"{args.iterations} timed runs after {args.warmup}, torch {torch.__version__}, threads {rows[0]['threads']}")
    print(f"{'backend':<10} {'ms/image (median)':>18} {'ms/image (min)':>15} {'peak MiB':>9} {'working MiB':>12} "
          f"{'speed vs reference':>19}")
    reference = next((r for r in rows if r["backend"] == "reference"), None)
    for row in rows:
        speed = f"{reference['ms_per_image'] / row['ms_per_image']:.2f}x" if reference else "-"
        print(f"{row['backend']:<10} {row['ms_per_image']:>18.1f} {row['min_ms_per_image']:>15.1f} "
              f"{row['peak_mib']:>9.0f} {row['working_mib']:>12.0f} {speed:>19}")


# ------------------------------------------------------------------ main

def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()


def describe_run():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("GIT_COMMIT", "")  # a copy of the tree without .git (GPU machine)
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit or 'unknown'}, "
            f"python {platform.python_version()}, {os.cpu_count()} CPUs; command: python {' '.join(sys.argv)}")


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
                             "on cuda with --baseline); syncs takes the first")
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
        environment = dict(os.environ)
        if args.mode == "infer":
            # A fixed mmap threshold makes glibc hand large freed blocks back, so the resident set
            # follows what is allocated (and the onnx row does not carry the freed torch model).
            environment["MALLOC_MMAP_THRESHOLD_"] = "65536"
        rows = []
        for amp in (precisions if args.mode == "train" else ["none"]):
            for backend in backends:
                result = subprocess.run(child_command(args, backend, amp), capture_output=True, text=True,
                                        env=environment)
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
