"""The original Deformable DETR kernel as a benchmark baseline, without touching the model code.

``load_original(path)`` imports an ALREADY BUILT original extension (MultiScaleDeformableAttention*.so,
built outside this repository; nothing here builds it) by path. Its interface, which is all this
module relies on::

    ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                           im2col_step) -> output (B, Q, H*C)
    ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight,
                            grad_output, im2col_step) -> [grad_value, grad_sampling_loc, grad_attn_weight]

A ``.py`` file with the same two functions loads too (the tests use a stand-in built on our
reference op, so that the plumbing runs in CI without the original code or a GPU).

``original_op(module)`` is that pair as a differentiable function with our op's signature;
``original_kernel_in_layers(module)`` routes every MSDeformAttn layer's operator call through it
for the duration, by replacing the name ``ms_deform_attn`` that detr_cuda/ops/module.py calls.
It yields a call counter: a run in which no call reached the original kernel (the layer no longer
calls the op by that name) must be reported as a failure, not as a baseline number;
``check_calls`` does that.

Dtypes: the original kernel has float32 and float64 kernels only. Under bf16/fp16 autocast its
inputs are cast to float32 (and the output back to value's dtype), as the usual ports of it do;
the casts are part of its time.
"""
import contextlib
import importlib.machinery
import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable

IM2COL_STEP = 64  # the original model's default


def load_original(path):
    """The original extension (or a .py stand-in with the same two functions), imported by path."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"original kernel: {path} does not exist (build the original extension "
                                "first; see 'Prepared GPU run' in benchmarks/RESULTS.md)")
    name = os.path.basename(path).split(".")[0]
    if path.endswith(".py"):
        loader = importlib.machinery.SourceFileLoader(name, path)
    else:
        loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    missing = [f for f in ("ms_deform_attn_forward", "ms_deform_attn_backward") if not hasattr(module, f)]
    if missing:
        raise ImportError(f"original kernel: {path} has no {', '.join(missing)}")
    return module


class _OriginalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, module,
                im2col_step):
        dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        value_c, locations_c, attention_c = (t.to(compute).contiguous()
                                             for t in (value, sampling_locations, attention_weights))
        spatial_shapes, level_start_index = spatial_shapes.contiguous(), level_start_index.contiguous()
        output = module.ms_deform_attn_forward(value_c, spatial_shapes, level_start_index, locations_c,
                                               attention_c, im2col_step)
        ctx.save_for_backward(value_c, spatial_shapes, level_start_index, locations_c, attention_c)
        ctx.module, ctx.im2col_step, ctx.dtypes = module, im2col_step, dtypes
        return output.to(value.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, attention = ctx.saved_tensors
        grad_value, grad_locations, grad_attention = ctx.module.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, attention,
            grad_output.to(value.dtype).contiguous(), ctx.im2col_step)
        return (grad_value.to(ctx.dtypes[0]), None, None, grad_locations.to(ctx.dtypes[1]),
                grad_attention.to(ctx.dtypes[2]), None, None)


def original_op(module, im2col_step=IM2COL_STEP):
    """ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
    backend=None) computed by the original kernel (``backend`` is ignored)."""
    def op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend=None):
        return _OriginalFunction.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, module, im2col_step)
    return op


@contextlib.contextmanager
def original_kernel_in_layers(module, im2col_step=IM2COL_STEP):
    """Every MSDeformAttn layer calls the original kernel for the duration; yields {"calls": n}."""
    from detr_cuda.ops import module as layer_module
    if not hasattr(layer_module, "ms_deform_attn"):
        raise RuntimeError("detr_cuda/ops/module.py no longer calls ms_deform_attn by that name: update "
                           "benchmarks/original_kernel.py's swap")
    counter = {"calls": 0}
    compute = original_op(module, im2col_step)

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return compute(*args, **kwargs)

    previous = layer_module.ms_deform_attn
    layer_module.ms_deform_attn = counted
    try:
        yield counter
    finally:
        layer_module.ms_deform_attn = previous


def check_calls(counter, what="the model"):
    if counter["calls"] == 0:
        raise RuntimeError(f"no call of {what} reached the original kernel: the MSDeformAttn layer no longer "
                           "calls detr_cuda.ops.module.ms_deform_attn; update benchmarks/original_kernel.py")
