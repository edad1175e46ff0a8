"""The ms_deform_attn operator's Python face: input checks, backend choice,
and the torch.library registration (fake implementation and autograd formula)
of the compiled op ``torch.ops.detr_cuda.ms_deform_attn_forward``.

Backends:
    ``cuda``       compiled CUDA kernel (tensors on a CUDA device)
    ``cpu``        compiled C++ kernel (tensors on the CPU)
    ``reference``  pure PyTorch on grid_sample (any device; slow, memory hungry)
By default the backend follows the device of ``value``. Force one with the
``backend`` argument or the environment variable ``DETR_CUDA_MSDA_BACKEND``
(``cpu``, ``cuda``, ``reference`` or ``auto``); the argument wins. When the
compiled extension is missing the reference runs instead, with one warning per
process; forcing a compiled backend that is not available raises an error that
says how to build it.

Dtype contract:
    value: float32, float64, float16 or bfloat16; the output has value's dtype.
    sampling_locations, attention_weights: value's dtype, or float32 when value
    is float16/bfloat16 (recommended: half-precision locations move samples
    by up to ~0.3 px on large maps). The compiled kernels take them in the
    accumulation type (float64 for float64 value, else float32) and sum
    everything, grad_value included, in that type; their gradients come back
    in the dtype they were passed in.
    spatial_shapes, level_start_index: int64 on value's device.

Autocast: the op is on no autocast cast list, so under torch.autocast it runs
in the dtype ``value`` arrives in (float16/bfloat16 from an autocast
value_proj), with float32 locations and weights, float32 accumulation and a
half-precision output. Nothing is silently promoted to float32.

Determinism: forward is deterministic on every backend; the CPU backward is
bitwise deterministic (no atomics); the CUDA backward's grad of locations and
weights always is (one writer each), and its grad_value is too under the
``deterministic`` strategy below, which torch.use_deterministic_algorithms(True)
(train.deterministic=true) selects when the variable is unset. The ``atomic``
and ``shared`` strategies use float atomics: grad_value may differ in its last
bits from run to run.

CUDA backward strategy for grad_value: the environment variable
``DETR_CUDA_MSDA_GRAD_VALUE``, read on every backward call:
    ``atomic`` (default)  every contribution is a global atomic add (vector
                          atomics on sm_90).
    ``shared``            blocks that each serve one (batch, head) sum the
                          coarse levels that fit their shared memory on chip
                          and add them to global memory once per block.
    ``deterministic``     contributions rounded to 64-bit fixed point (a
                          power-of-two scale from max|grad_output| *
                          max|attention| * Q * P, chosen on the GPU) and added
                          as integers, so the order of the atomics cannot
                          matter; absolute error <= 2^-62 * Q * P *
                          max|grad_output| * max|attention| per contribution;
                          a NaN/Inf in grad_output or attention_weights makes
                          all of grad_value NaN. Needs an int64 workspace the
                          size of value.
All give the same gradients up to summation order and that rounding (grad of
locations and weights are bitwise the same); any other value raises a
RuntimeError.

Gradients: first order for value, sampling_locations and attention_weights;
differentiating the compiled backward again raises NotImplementedError.
Checks: shapes, dtypes and devices on every call; the level geometry
(S == sum H_l*W_l, level_start_index) once per spatial_shapes tensor (geometry.py):
never read back from the device when the pair was made by ``level_geometry``
from Python level sizes (as the models do), else one small device-to-host copy
the first time (skipped while torch.compile traces).
"""
import os
import warnings

import torch

from .geometry import check_level_geometry
from .reference import ms_deform_attn_reference

try:
    from detr_cuda import _C
    _EXTENSION_IMPORT_ERROR = None
except ImportError as error:  # not built: the reference backend takes over
    _C = None
    _EXTENSION_IMPORT_ERROR = error

BACKEND_ENV_VAR = "DETR_CUDA_MSDA_BACKEND"
BACKENDS = ("cpu", "cuda", "reference")
BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` (or `make install`); "
              "in a checkout, `python setup.py build_ext --inplace` builds it in place")
_VALUE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LAYOUTS = {"value": "(B, S, H, C)", "spatial_shapes": "(L, 2)", "level_start_index": "(L,)",
            "sampling_locations": "(B, Q, H, L, P, 2)", "attention_weights": "(B, Q, H, L, P)"}
_RANKS = {"value": 4, "spatial_shapes": 2, "level_start_index": 1, "sampling_locations": 6,
          "attention_weights": 5}

_fallback_warned = False


def extension_available():
    """True when the compiled extension detr_cuda._C imports."""
    return _C is not None


def cuda_extension_available():
    """True when the compiled extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)


def available_backends(device):
    """Backends that can run on ``device`` (a torch.device or string), best first."""
    device = torch.device(device)
    backends = []
    if device.type == "cuda" and cuda_extension_available():
        backends.append("cuda")
    if device.type == "cpu" and extension_available():
        backends.append("cpu")
    backends.append("reference")
    return backends


def _warn_fallback(device):
    global _fallback_warned
    if _fallback_warned or torch.compiler.is_compiling():
        return
    _fallback_warned = True
    if _C is None:
        why = f"the compiled extension detr_cuda._C is not available ({_EXTENSION_IMPORT_ERROR})"
    else:
        why = f"the compiled extension has no kernel for {device.type} tensors"
    warnings.warn(f"ms_deform_attn: {why}; using the slow pure-PyTorch reference backend. To use the "
                  f"compiled kernels, {BUILD_HINT}.", RuntimeWarning, stacklevel=4)


def resolve_backend(backend, device):
    """The backend that will run for tensors on ``device``.

    ``backend`` (or, when it is None, $DETR_CUDA_MSDA_BACKEND) is one of
    cpu / cuda / reference / auto; auto follows the device.
    """
    requested = backend if backend is not None else (os.environ.get(BACKEND_ENV_VAR) or "auto")
    requested = requested.lower()
    if requested not in BACKENDS + ("auto",):
        source = "backend argument" if backend is not None else f"${BACKEND_ENV_VAR}"
        raise ValueError(f"ms_deform_attn: unknown backend {requested!r} from the {source}; "
                         f"expected one of {', '.join(BACKENDS + ('auto',))}")
    if requested == "auto":
        native = available_backends(device)[0]
        if native == "reference":
            _warn_fallback(device)
        return native
    if requested == "reference":
        return requested
    if _C is None:
        raise RuntimeError(f"ms_deform_attn: backend {requested!r} was requested but the compiled extension "
                           f"detr_cuda._C is not available ({_EXTENSION_IMPORT_ERROR}); {BUILD_HINT}")
    if requested == "cuda" and not _C.with_cuda:
        raise RuntimeError("ms_deform_attn: backend 'cuda' was requested but detr_cuda._C was built without CUDA; "
                           f"rebuild with a CUDA build of torch and nvcc on the PATH (FORCE_CUDA=1 when no GPU is "
                           f"visible at build time): {BUILD_HINT}")
    if device.type != requested:
        raise ValueError(f"ms_deform_attn: backend {requested!r} needs tensors on {requested}, "
                         f"but value is on {device}")
    return requested


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    named = (("value", value), ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
             ("sampling_locations", sampling_locations), ("attention_weights", attention_weights))
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name, tensor in named:
        if tensor.dim() != _RANKS[name]:
            raise ValueError(f"ms_deform_attn: {name} must be {_RANKS[name]}-d {_LAYOUTS[name]}, "
                             f"got shape {tuple(tensor.shape)}")
    batch, _, heads, _ = value.shape
    levels = spatial_shapes.shape[0]
    _, queries, _, _, points, _ = sampling_locations.shape
    expected = {
        "spatial_shapes": (levels, 2),
        "level_start_index": (levels,),
        "sampling_locations": (batch, queries, heads, levels, points, 2),
        "attention_weights": (batch, queries, heads, levels, points),
    }
    for name, tensor in named[1:]:
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"ms_deform_attn: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                f"{_LAYOUTS[name]} from value {tuple(value.shape)}, spatial_shapes {tuple(spatial_shapes.shape)} "
                f"and sampling_locations {tuple(sampling_locations.shape)}")

    if value.dtype not in _VALUE_DTYPES:
        raise TypeError(f"ms_deform_attn: value dtype must be float32, float64, float16 or bfloat16, "
                        f"got {value.dtype}")
    allowed = (value.dtype, torch.float32) if value.dtype in (torch.float16, torch.bfloat16) else (value.dtype,)
    for name, tensor in named[3:]:
        if tensor.dtype not in allowed:
            raise TypeError(f"ms_deform_attn: {name} dtype must be "
                            f"{' or '.join(str(d) for d in allowed)} for {value.dtype} value, got {tensor.dtype}")
    for name, tensor in named[1:3]:
        if tensor.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {tensor.dtype}")
    for name, tensor in named[1:]:
        if tensor.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {tensor.device} but value is on {value.device}; "
                             "all inputs must be on one device")
    if not torch.compiler.is_compiling():
        check_level_geometry(spatial_shapes, level_start_index, value.shape[1])


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   backend=None):
    """Multi-scale deformable attention.

    Args:
        value: (B, S, H, C), S = sum over levels of H_l * W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level in S.
        sampling_locations: (B, Q, H, L, P, 2), (x, y) normalised to [0, 1];
            samples outside the maps read zeros; a NaN or infinite location
            samples nothing (zeros, zero gradient), on every backend.
        attention_weights: (B, Q, H, L, P), already softmaxed over L*P.
        backend: None (DETR_CUDA_MSDA_BACKEND or by device), "cpu", "cuda",
            "reference" or "auto".
    Returns:
        (B, Q, H * C) in value's dtype. Dtypes, autocast and determinism: see
        this module's docstring.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = resolve_backend(backend, value.device)
    if chosen == "reference":
        compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
        compute_dtype = torch.promote_types(compute_dtype, attention_weights.dtype)
        output = ms_deform_attn_reference(value.to(compute_dtype), spatial_shapes, level_start_index,
                                          sampling_locations.to(compute_dtype), attention_weights.to(compute_dtype))
        return output.to(value.dtype)
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    return torch.ops.detr_cuda.ms_deform_attn_forward(
        value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.to(acc_dtype).contiguous(), attention_weights.to(acc_dtype).contiguous())


if _C is not None:
    @torch.library.register_fake("detr_cuda::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * channels))

    @torch.library.register_fake("detr_cuda::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_attention = torch.ops.detr_cuda.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights)
        return grad_value, None, None, grad_locations, grad_attention

    torch.library.register_autograd("detr_cuda::ms_deform_attn_forward", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError("ms_deform_attn has no second derivative (double backward); the compiled "
                                  "backends support first-order gradients only, use backend='reference' for more")

    # Without this, differentiating the backward would silently give wrong
    # (missing) terms; with it, it raises.
    torch.library.register_autograd("detr_cuda::ms_deform_attn_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
