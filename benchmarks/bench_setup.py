"""What bench_model.py's modes and profile_step.py share: model variants and presets, building a model
with a given MSDeformAttn backend, synthetic batches, peak-memory readings and the run header."""
import contextlib
import datetime
import os
import platform
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from detr_cuda.config import load_config  # noqa: E402
from detr_cuda.models import build_model  # noqa: E402
from detr_cuda.ops import MSDeformAttn  # noqa: E402
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

NUM_CLASSES = 91


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


def timed_runs(run, device, warmup, iterations):
    """Calls ``run`` ``warmup`` times untimed, then ``iterations`` times timed. Returns (the timed runs'
    seconds, sorted; peak MiB during them: CUDA allocator peak or the process's VmHWM; MiB in use
    before them)."""
    for _ in range(warmup):
        run()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        reset_worked = reset_cpu_peak()
        before = status_mib("VmRSS")
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else cpu_peak_mib(reset_worked)
    return sorted(times), peak, before


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
