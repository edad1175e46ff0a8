"""Benchmark of the ms_deform_attn operator.

Prints one Markdown table: for each shape, backend and dtype the median
forward, backward and forward+backward times, the forward+backward speedup
over the reference backend (same shape and dtype, same run) and the peak
memory of one forward+backward. On a GPU it also gives the achieved bytes/s
of the compulsory memory traffic and the fraction of the modelled floor
(formulas of /work/shared/kernel_floors.py, rewritten below).

Shapes (Deformable DETR defaults: B=2, 8 heads x 32 channels, 4 levels, 4 points):
    enc320   encoder of a 320x320 image   (maps 40x40 .. 5x5, Q = S = 2,125)
    enc800   encoder of an 800x1333 image (maps 100x167 .. 13x21, Q = S = 22,223)
    enc800b8 enc800 with a batch of 8
    dec300   decoder, 300 queries on the 800x1333 maps
    dec900   decoder, 900 queries (300 + 600 denoising) on the 800x1333 maps
    tiny     maps 8x8 .. 1x1 (Q = S = 85): a seconds-long check of the script itself (gpu_suite.sh --dry-run)
Sampling locations follow the layer's init pattern (8 directions, 1..4 px per
point) plus noise around pixel-centre (encoder) or uniform (decoder)
reference points; --distribution uniform draws them uniformly instead.

Timing: CPU wall clock (time.perf_counter); GPU CUDA events around each call.
Medians over --reps after --warmup. Backward is timed alone (the forward that
builds its graph is outside the timer).
Peak memory: GPU torch.cuda.max_memory_allocated over one forward+backward,
minus what was allocated before. CPU (Linux): the peak resident set size
(VmHWM, reset through /proc/self/clear_refs just before) during one
forward+backward minus the resident set before it, in a fresh subprocess per
row with glibc's mmap threshold fixed at 64 KiB so that freed large blocks
leave the resident set.

Backends: cpu, cuda, reference, original (with --baseline; on the CPU only when --backends names it,
since the original extension has no CPU kernel), and
cuda-shared / cuda-deterministic: the cuda backend with the shared-memory or
the deterministic (fixed-point) grad_value strategy
(DETR_CUDA_MSDA_GRAD_VALUE=shared / deterministic, set around each call; the
cuda row sets atomic), so that the backward strategies are timed side by side.

--baseline PATH imports an ALREADY BUILT original Deformable DETR extension
(MultiScaleDeformableAttention*.so, built outside this repository) by path and
times it beside ours on CUDA. This script never builds it
(benchmarks/original_kernel.py says what it relies on).

Examples:
    python benchmarks/bench_msda.py --device cpu
    python benchmarks/bench_msda.py --device cpu --distribution uniform
    python benchmarks/bench_msda.py --device cuda --dtypes float32 bfloat16 float16
    python benchmarks/bench_msda.py --device cuda --baseline ~/dd_ops/MultiScaleDeformableAttention.cpython-311-x86_64-linux-gnu.so
"""
import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from detr_cuda.ops import functional, ms_deform_attn  # noqa: E402
from original_kernel import IM2COL_STEP, load_original  # noqa: E402

# Re-exported names (BATCH, HEADS, POINTS, traffic_bytes): tests read them through this module.
from msda_cases import (BATCH, CHANNELS, DEFAULT_SHAPES, DTYPES, GPU_SPECS, HEADS, POINTS, SHAPES,  # noqa: E402,F401
                        floor_ms, make_inputs, traffic_bytes)

GRAD_VALUE_ENV_VAR = "DETR_CUDA_MSDA_GRAD_VALUE"
# Benchmark backend name -> (op backend, CUDA grad_value strategy or None).
OUR_BACKENDS = {"cpu": ("cpu", None), "reference": ("reference", None), "cuda": ("cuda", "atomic"),
                "cuda-shared": ("cuda", "shared"), "cuda-deterministic": ("cuda", "deterministic")}


@contextlib.contextmanager
def grad_value_strategy(strategy):
    """Sets $DETR_CUDA_MSDA_GRAD_VALUE for the duration (None: leave it alone)."""
    if strategy is None:
        yield
        return
    previous = os.environ.get(GRAD_VALUE_ENV_VAR)
    os.environ[GRAD_VALUE_ENV_VAR] = strategy
    try:
        yield
    finally:
        if previous is None:
            del os.environ[GRAD_VALUE_ENV_VAR]
        else:
            os.environ[GRAD_VALUE_ENV_VAR] = previous


class OursBackend:
    def __init__(self, name):
        self.name = name
        self.op_backend, self.strategy = OUR_BACKENDS[name]

    def forward(self, inputs):
        with torch.no_grad():
            return ms_deform_attn(*inputs, backend=self.op_backend)

    def prepare_backward(self, inputs, grad_output):
        leaves = [inputs[0].detach().requires_grad_(), inputs[3].detach().requires_grad_(),
                  inputs[4].detach().requires_grad_()]
        output = ms_deform_attn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2], backend=self.op_backend)

        def backward():
            with grad_value_strategy(self.strategy):  # the CUDA glue reads it when the backward runs
                return torch.autograd.grad(output, leaves, grad_output)
        return backward

    def forward_backward(self, inputs, grad_output):
        leaves = [inputs[0].detach().requires_grad_(), inputs[3].detach().requires_grad_(),
                  inputs[4].detach().requires_grad_()]
        with grad_value_strategy(self.strategy):
            output = ms_deform_attn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2], backend=self.op_backend)
            return torch.autograd.grad(output, leaves, grad_output)


class BaselineBackend:
    """The original kernel's extension (ms_deform_attn_forward / _backward with im2col_step)."""

    name = "original"

    def __init__(self, path):
        self.module = load_original(path)

    def forward(self, inputs):
        value, shapes, starts, loc, attn = inputs
        return self.module.ms_deform_attn_forward(value, shapes, starts, loc, attn, IM2COL_STEP)

    def prepare_backward(self, inputs, grad_output):
        value, shapes, starts, loc, attn = inputs
        return lambda: self.module.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_output,
                                                           IM2COL_STEP)

    def forward_backward(self, inputs, grad_output):
        self.forward(inputs)
        return self.prepare_backward(inputs, grad_output)()


def backend_runs(backend_name, dtype, device, baseline, named=()):
    """Whether a backend row exists for this dtype on this device (``named``: the backends the
    command line listed; the original runs on the CPU only when listed, for a stand-in)."""
    if backend_name == "original":
        return (baseline is not None and (device == "cuda" or "original" in named)
                and dtype in (torch.float32, torch.float64))
    if backend_name == "reference":
        return dtype != torch.float16 or device == "cuda"
    if backend_name not in OUR_BACKENDS:
        return False
    return OUR_BACKENDS[backend_name][0] in functional.available_backends(device)


# ------------------------------------------------------------------ timing

def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(call, device, reps, warmup, prepare=None):
    """Median milliseconds of call() (or of the function prepare() returns)."""
    times = []
    for rep in range(warmup + reps):
        target = prepare() if prepare is not None else call
        synchronize(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            target()
            elapsed = (time.perf_counter() - began) * 1e3
        if rep >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def peak_memory_mb(backend, inputs, grad_output, device, shape_name, dtype_name, args):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        backend.forward_backward(inputs, grad_output)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", shape_name, backend.name, dtype_name,
               "--distribution", args.distribution]
    # A fixed mmap threshold makes glibc return every large block to the OS on
    # free, so the resident set follows what is really allocated.
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=environment)
    if result.returncode != 0 or "nan" in result.stdout:
        print(f"# memory probe failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return float("nan")
    return float(result.stdout.strip().splitlines()[-1])


def memory_probe(shape_name, backend_name, dtype_name, distribution):
    """Run in a fresh process: print the ru_maxrss growth (MiB) of one fwd+bwd."""
    inputs = make_inputs(shape_name, DTYPES[dtype_name], "cpu", distribution)
    grad_output = torch.randn(inputs[3].shape[0], inputs[3].shape[1], HEADS * CHANNELS).to(DTYPES[dtype_name])
    backend = OursBackend(backend_name)
    # One small call first, so thread pools and other one-time set-up are not counted.
    small = make_inputs("enc320", DTYPES[dtype_name], "cpu", distribution)
    backend.forward_backward([small[0][:1], small[1], small[2], small[3][:1, :8], small[4][:1, :8]],
                             torch.zeros(1, 8, HEADS * CHANNELS, dtype=DTYPES[dtype_name]))
    del small
    # Reset the kernel's resident-set high-water mark (VmHWM), then read it back.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not Linux: no measurement
        print("nan")
        return
    resident_before = status_kib("VmRSS")
    backend.forward_backward(inputs, grad_output)
    print((status_kib("VmHWM") - resident_before) / 1024)


def status_kib(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


# ------------------------------------------------------------------ floors

def describe_machine(device):
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        # A copy of the tree without .git (the GPU machine): the caller names it in $GIT_COMMIT.
        name = commit.stdout.strip() or os.environ.get("GIT_COMMIT", "unknown")
        lines.append(f"commit: {name}{' (with uncommitted changes)' if dirty else ''}")
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
        lines.append(f"cpu: {model}")
    except OSError:
        pass
    if device == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    elif functional.extension_available():
        # The widest instruction set torch's CPU capability allows
        # (ATEN_CPU_CAPABILITY lowers it): baseline, avx2 or avx512.
        lines.append(f"cpu kernel instruction set: {functional._C.cpu_kernel_isa()}")
    lines.append(f"command: python {' '.join(sys.argv)}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="default: enc320 dec300 dec900 on CPU (enc800 is minutes there); enc800 enc800b8 dec300 "
                             "dec900 on a GPU")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: float32 on CPU; float32 bfloat16 float16 on a GPU")
    parser.add_argument("--backends", nargs="+", choices=sorted(OUR_BACKENDS) + ["original"], default=None,
                        help="default: every available one of cuda, cuda-shared, cuda-deterministic (GPU) or "
                             "cpu, reference, "
                             "original (with --baseline)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default CPU 5, GPU 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default CPU 1, GPU 10)")
    parser.add_argument("--distribution", choices=["realistic", "uniform"], default="realistic")
    parser.add_argument("--baseline", metavar="PATH", help="an already built original-kernel extension (.so)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--memory-probe", nargs=3, metavar=("SHAPE", "BACKEND", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_probe:
        memory_probe(*args.memory_probe, args.distribution)
        return

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device == "cuda"
    shapes = args.shapes or DEFAULT_SHAPES[device]
    dtype_names = args.dtypes or (["float32", "bfloat16", "float16"] if on_gpu else ["float32"])
    backends = args.backends or (["original"] if args.baseline else []) + (
        ["cuda", "cuda-shared", "cuda-deterministic"] if on_gpu else ["cpu"]) + ["reference"]
    reps = args.reps or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    baseline = BaselineBackend(args.baseline) if args.baseline else None
    gpu = next((spec for key, spec in GPU_SPECS.items() if on_gpu and key in torch.cuda.get_device_name()), None)

    for line in describe_machine(device):
        print(f"# {line}")
    print(f"# reps {reps}, warmup {warmup}, sampling {args.distribution}; times are medians in ms")
    header = ["shape", "backend", "dtype", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd speedup vs reference",
              "peak MiB (fwd+bwd)"]
    if gpu:
        header += ["fwd GB/s", "fwd floor/time", "bwd GB/s", "bwd floor/time"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for shape_name in shapes:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            inputs = make_inputs(shape_name, dtype, device, args.distribution)
            grad_output = torch.randn(inputs[3].shape[0], inputs[3].shape[1], HEADS * CHANNELS,
                                      device=device).to(dtype)
            reference_total = None
            rows = []
            for backend_name in sorted(backends, key=lambda name: name != "reference"):
                if not backend_runs(backend_name, dtype, device, baseline, args.backends or ()):
                    continue
                backend = baseline if backend_name == "original" else OursBackend(backend_name)
                forward = median_ms(lambda: backend.forward(inputs), device, reps, warmup)
                backward = median_ms(None, device, reps, warmup,
                                     prepare=lambda: backend.prepare_backward(inputs, grad_output))
                total = median_ms(lambda: backend.forward_backward(inputs, grad_output), device, reps, warmup)
                if backend_name == "reference":
                    reference_total = total
                memory = (float("nan") if args.no_memory or backend_name == "original" and not on_gpu else
                          peak_memory_mb(backend, inputs, grad_output, device, shape_name, dtype_name, args))
                speedup = f"{reference_total / total:.2f}x" if reference_total else "n/a"
                row = [shape_name, backend_name, dtype_name, f"{forward:.3f}", f"{backward:.3f}", f"{total:.3f}",
                       speedup, f"{memory:.0f}"]
                if gpu:
                    forward_floor, backward_floor, forward_bytes, backward_bytes = floor_ms(
                        shape_name, torch.finfo(dtype).bits // 8, gpu)
                    row += [f"{forward_bytes / forward / 1e6:.0f}", f"{forward_floor / forward:.2f}",
                            f"{backward_bytes / backward / 1e6:.0f}", f"{backward_floor / backward:.2f}"]
                rows.append(row)
            for row in rows:
                print("| " + " | ".join(row) + " |", flush=True)
            del inputs, grad_output
            if on_gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
