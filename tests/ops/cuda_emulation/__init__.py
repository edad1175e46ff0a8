"""Build and load the CPU emulation of the CUDA kernels (see msda_emu.h).

``build_library(name, source)`` compiles one C++ file that includes
msda_emu.h (and, for the operator, csrc/cuda/ms_deform_attn_cuda.cu) with g++
into ``build/cuda_emulation/<hash>/lib<name>.so``, where the hash covers the
compiler command and every source the build reads, so an edited kernel is
rebuilt and an unchanged one is reused. ``load_emulator()`` wraps the operator
library: ``forward`` / ``backward`` take CPU tensors, run the exact CUDA
kernels on the CPU and raise ``EmulatedLaunchError`` (code, message) on a
launch or kernel error. ``EmulatorUnavailable`` means g++ or the CUDA headers
are missing: the tests skip with its message. Pass a tensor to a library
function as ``pointer(tensor)``, never as a bare ``c_void_p(t.data_ptr())``:
only the former keeps a temporary tensor alive until the kernel has run.
"""
import ctypes
import glob
import hashlib
import math
import mmap
import os
import shutil
import subprocess
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
# MSDA_EMU_CSRC=/path/to/another/csrc runs another checkout's kernels (e.g. a work in progress).
CSRC = os.path.abspath(os.environ.get("MSDA_EMU_CSRC", os.path.join(REPO, "csrc")))
BUILD_ROOT = os.path.join(REPO, "build", "cuda_emulation")

# -fsanitize=alignment turns a misaligned typed access into a launch error
# (msda_emu.h provides the sanitizer's handler; no libubsan is linked);
# -fstack-clash-protection makes a too-large stack frame touch the guard page
# below a thread's stack instead of jumping past it.
CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-fsanitize=alignment", "-fstack-clash-protection",
             "-Wall", "-Wno-unknown-pragmas"]
# Linked in a second step without -fsanitize, so libubsan is not pulled in.
LINK_FLAGS = ["-shared", "-Wl,--no-undefined"]

# detr_cuda::ValueType
VALUE_TYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CUDA_ERRORS = {1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration", 700: "cudaErrorIllegalAddress",
               702: "cudaErrorLaunchTimeout", 710: "cudaErrorAssert", 716: "cudaErrorMisalignedAddress",
               719: "cudaErrorLaunchFailure"}


class EmulatorUnavailable(RuntimeError):
    """No g++ or no CUDA headers (cuda_fp16.h) on this machine."""


class EmulatedLaunchError(RuntimeError):
    def __init__(self, code, message):
        self.code = code
        self.name = CUDA_ERRORS.get(code, f"cudaError {code}")
        super().__init__(f"{self.name}: {message}")


def cuda_include_dir():
    """The CUDA include directory holding cuda_fp16.h, or raise EmulatorUnavailable."""
    candidates = []
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME:
            candidates.append(CUDA_HOME)
    except Exception:  # noqa: BLE001 - any failure just means "not from torch"
        pass
    candidates += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    raise EmulatorUnavailable(
        "CUDA emulation needs the CUDA headers (cuda_fp16.h), found in none of: "
        + ", ".join(str(c) for c in candidates if c))


def compiler():
    cxx = shutil.which(os.environ.get("MSDA_EMU_CXX", "g++"))
    if cxx is None:
        raise EmulatorUnavailable("CUDA emulation needs g++ (or MSDA_EMU_CXX), which is not on PATH")
    return cxx


def _sources_for(source):
    files = [source] + sorted(glob.glob(os.path.join(HERE, "*.h")))
    files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.h"))
                    + glob.glob(os.path.join(CSRC, "*.h")))
    return files


def build_library(name, source, defines=()):
    """Compile ``source`` (a path) into a shared library once per content hash; return its path.

    ``defines``: extra preprocessor definitions, e.g. ``("MSDA_VECTOR_ATOMICS=1",)``.
    """
    cxx = compiler()
    include = cuda_include_dir()
    command = [cxx] + CXX_FLAGS + ["-D" + define for define in defines] + ["-I" + CSRC, "-I" + HERE, "-I" + include]
    digest = hashlib.sha256(" ".join(command + LINK_FLAGS).encode())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    for path in _sources_for(source):
        digest.update(os.path.relpath(path, REPO).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    out_dir = os.path.join(BUILD_ROOT, digest.hexdigest()[:16])
    library = os.path.join(out_dir, f"lib{name}.so")
    if os.path.exists(library):
        os.utime(out_dir)  # recently used: kept by _prune
        return library
    os.makedirs(out_dir, exist_ok=True)
    # Export only the msda_emu_* entry points.
    script = os.path.join(out_dir, f"{name}.map")
    with open(script, "w") as handle:
        handle.write("{ global: msda_emu_*; local: *; };\n")
    # Build into temporary names, then rename: concurrent runs never load half a file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    objects = partial[:-len(".so")] + ".o"
    steps = [command + ["-c", source, "-o", objects],
             [cxx] + LINK_FLAGS + [objects, "-o", partial, f"-Wl,--version-script={script}"]]
    try:
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building the CUDA emulation of {os.path.relpath(source, REPO)} failed:\n"
                                   + " ".join(step) + "\n" + result.stderr[-8000:])
        os.replace(partial, library)
    finally:
        for path in (objects, partial):
            if os.path.exists(path):
                os.unlink(path)
    _prune(keep=12)
    return library


def _prune(keep):
    """Remove all but the ``keep`` newest build directories (a loaded library survives its unlinking)."""
    dirs = sorted((os.path.join(BUILD_ROOT, d) for d in os.listdir(BUILD_ROOT)), key=os.path.getmtime, reverse=True)
    for stale in dirs[keep:]:
        shutil.rmtree(stale, ignore_errors=True)


class EmulatedLibrary:
    """A library built from msda_emu.h: the control functions every one exports."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.msda_emu_last_error_message.restype = ctypes.c_char_p
        self.lib.msda_emu_take_launch_log.restype = ctypes.c_char_p
        self.lib.msda_emu_set_device.argtypes = [ctypes.c_int, ctypes.c_int]
        self.lib.msda_emu_set_seed.argtypes = [ctypes.c_uint64]
        self.lib.msda_emu_set_time_limit.argtypes = [ctypes.c_double]
        self.lib.msda_emu_take_vector_atomics.restype = ctypes.c_uint64

    def last_error_message(self):
        return self.lib.msda_emu_last_error_message().decode()

    def take_launch_log(self):
        """Lines "<kernel> grid=(..) block=(..) shared=<bytes>", one per launch since the last call."""
        return [line for line in self.lib.msda_emu_take_launch_log().decode().splitlines() if line]

    def take_vector_atomics(self):
        """How many float4 / float2 atomicAdds ran since the last call (0 unless built with vector_atomics)."""
        return self.lib.msda_emu_take_vector_atomics()

    def set_device(self, sm_count=132, max_shared_optin_bytes=227 * 1024):
        self.lib.msda_emu_set_device(sm_count, max_shared_optin_bytes)

    def set_time_limit(self, seconds):
        """CPU seconds a launch may run before it fails with cudaErrorLaunchTimeout (default 300)."""
        self.lib.msda_emu_set_time_limit(seconds)

    def set_seed(self, seed):
        self.lib.msda_emu_set_seed(seed)

    def reset_errors(self):
        self.lib.msda_emu_reset_errors()

    def check(self, code):
        if code != 0:
            message = self.last_error_message()
            self.reset_errors()  # kernel faults are sticky; the next test starts clean
            raise EmulatedLaunchError(code, message)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
GUARD_BYTES = 1 << 20


class Guarded:
    """A tensor for an emulated kernel, fenced in on both sides.

    The tensor (``.tensor``, of ``shape`` and ``dtype``) starts ``margin +
    shift`` elements into a page-rounded region of its own mmap; everything
    else in that region (at least ``margin`` elements each side) holds
    ``fill``, and 1 MiB of inaccessible pages lie beyond the region on both
    sides, so that a kernel running past the tensor either changes the
    margins (``margins_unchanged()`` says so) or faults (the launch fails with
    cudaErrorIllegalAddress) instead of corrupting the test process. The
    tensor starts as ``init`` (copied) or ``interior`` (a fill value).
    """

    def __init__(self, shape, dtype, fill, init=None, interior=None, shift=0, margin=64):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = math.prod(shape)
        region = -(-(numel + 2 * margin + shift) * itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, 2 * GUARD_BYTES + region)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        for offset in (0, GUARD_BYTES + region):
            if _LIBC.mprotect(whole.data_ptr() + offset, GUARD_BYTES, 0) != 0:  # PROT_NONE
                raise OSError(ctypes.get_errno(), "mprotect failed")
        self.buffer = whole[GUARD_BYTES:GUARD_BYTES + region].view(dtype)
        self.buffer.fill_(fill)
        self.start, self.end = margin + shift, margin + shift + numel
        self.tensor = self.buffer[self.start:self.end].view(shape)
        if init is not None:
            self.tensor.copy_(init)
        elif interior is not None:
            self.tensor.fill_(interior)
        self.before = self.buffer.clone()

    def margins_unchanged(self):
        now, before = self.buffer.view(torch.uint8), self.before.view(torch.uint8)
        itemsize = self.buffer.element_size()
        head, tail = self.start * itemsize, self.end * itemsize
        return torch.equal(now[:head], before[:head]) and torch.equal(now[tail:], before[tail:])

    def unchanged(self):
        return torch.equal(self.buffer.view(torch.uint8), self.before.view(torch.uint8))


def pointer(tensor):
    """``tensor``'s data as a ctypes argument that keeps ``tensor`` alive as long as the argument lives.

    A bare ``ctypes.c_void_p(tensor.data_ptr())`` holds only the address: in
    ``lib.f(c_void_p(torch.zeros(40).data_ptr()))`` the zeros are freed before
    ``f`` runs, and a kernel writing there overwrites malloc's free-list links,
    so the process aborts later in unrelated code ("malloc(): unsorted double
    linked list corrupted"). ``None`` gives a null pointer.
    """
    if tensor is None:
        return ctypes.c_void_p(0)
    argument = ctypes.c_void_p(tensor.data_ptr())
    argument.tensor = tensor  # the call's argument tuple holds this object, so the tensor outlives the call
    return argument


# detr_cuda::GradValueStrategy (csrc/cuda/ms_deform_attn_cuda.h).
ATOMIC, SHARED, DETERMINISTIC = 0, 1, 2
STRATEGIES = (ATOMIC, SHARED, DETERMINISTIC)


class Emulator(EmulatedLibrary):
    """csrc/cuda/ms_deform_attn_cuda.cu's launchers on CPU tensors."""

    def __init__(self, path):
        super().__init__(path)
        sizes = [ctypes.c_int] + [ctypes.c_int64] * 7
        self.lib.msda_emu_forward.argtypes = sizes + [ctypes.c_void_p] * 6
        self.lib.msda_emu_backward.argtypes = sizes + [ctypes.c_void_p] * 9 + [ctypes.c_int, ctypes.c_void_p]

    @staticmethod
    def sizes(value, sampling_locations):
        batch, num_values, num_heads, channels = value.shape
        num_queries, num_levels, num_points = sampling_locations.shape[1], sampling_locations.shape[3], \
            sampling_locations.shape[4]
        return batch, num_values, num_heads, channels, num_queries, num_levels, num_points

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output):
        """Writes ``output`` (B, Q, H*C) of value's dtype; all tensors contiguous CPU tensors (views allowed)."""
        code = self.lib.msda_emu_forward(
            VALUE_TYPES[value.dtype], *self.sizes(value, sampling_locations), pointer(value), pointer(spatial_shapes),
            pointer(level_start_index), pointer(sampling_locations), pointer(attention_weights), pointer(output))
        self.check(code)

    def backward(self, grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, grad_value_acc, grad_locations, grad_attention, strategy=ATOMIC, workspace=None):
        """Adds into the zeroed ``grad_value_acc`` (accumulation dtype) and writes the two other gradients.

        ``strategy``: the launcher's GradValueStrategy (ATOMIC, SHARED, DETERMINISTIC). DETERMINISTIC
        needs ``workspace``, a zeroed int64 tensor of value.numel() + 2 elements (made here when None).
        """
        if strategy == DETERMINISTIC and workspace is None:
            workspace = torch.zeros(value.numel() + 2, dtype=torch.int64)
        code = self.lib.msda_emu_backward(
            VALUE_TYPES[value.dtype], *self.sizes(value, sampling_locations), pointer(grad_output), pointer(value),
            pointer(spatial_shapes), pointer(level_start_index), pointer(sampling_locations),
            pointer(attention_weights), pointer(grad_value_acc), pointer(grad_locations), pointer(grad_attention),
            strategy, pointer(workspace))
        self.check(code)


def load_emulator(sm_count=None, max_shared_optin_bytes=None, vector_atomics=False):
    """The operator's kernels, built (or reused) and loaded.

    With ``sm_count`` / ``max_shared_optin_bytes``, a separate copy of the
    library (its own static state: launchers may cache device attributes)
    reports that device from its first cudaDeviceGetAttribute on. With
    ``vector_atomics``, the build runs the kernels' sm_90 branch (float4 /
    float2 atomicAdd, under MSDA_VECTOR_ATOMICS) instead of the portable one.
    """
    defines = ("MSDA_VECTOR_ATOMICS=1",) if vector_atomics else ()
    path = build_library("msda_emu", os.path.join(HERE, "msda_emu_entry.cpp"), defines)
    if sm_count is None and max_shared_optin_bytes is None:
        return Emulator(path)
    sm_count = 132 if sm_count is None else sm_count
    max_shared_optin_bytes = 227 * 1024 if max_shared_optin_bytes is None else max_shared_optin_bytes
    variant = path[:-len(".so")] + f"-sm{sm_count}-shared{max_shared_optin_bytes}.so"
    if not os.path.exists(variant):
        fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        shutil.copyfile(path, partial)
        os.replace(partial, variant)
    emulator = Emulator(variant)
    emulator.set_device(sm_count, max_shared_optin_bytes)
    return emulator


def load_library(name, source):
    """Any other file built on msda_emu.h (e.g. the emulator's own self-tests)."""
    return EmulatedLibrary(build_library(name, source))
