"""A stand-in for the original Deformable DETR extension (MultiScaleDeformableAttention*.so).

Same two functions, call signature and input contract as the original's (contiguous tensors;
value, locations and weights in one floating dtype; int64 level tensors; a batch that
im2col_step divides), computed with OUR reference op, so that the benchmarks' ``--baseline``
path runs on a CPU in CI. It is not the original code. ``calls`` counts the calls.
"""
import torch

from detr_cuda.ops import ms_deform_attn_reference

calls = {"forward": 0, "backward": 0}


def _check(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step, *extra):
    tensors = (value, spatial_shapes, level_start_index, sampling_loc, attn_weight) + extra
    if not all(t.is_contiguous() for t in tensors):
        raise RuntimeError("stand-in original kernel: every input must be contiguous")
    if value.dtype not in (torch.float32, torch.float64) or any(
            t.dtype != value.dtype for t in (sampling_loc, attn_weight) + extra):
        raise RuntimeError(f"stand-in original kernel: float32/float64 only, one dtype, got {value.dtype}, "
                           f"{sampling_loc.dtype}, {attn_weight.dtype}")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise RuntimeError("stand-in original kernel: spatial_shapes / level_start_index must be int64")
    batch = value.shape[0]
    if batch % min(batch, im2col_step) != 0:
        raise RuntimeError(f"stand-in original kernel: batch {batch} must divide im2col_step {im2col_step}")


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step):
    _check(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step)
    calls["forward"] += 1
    with torch.no_grad():
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)


def ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output,
                            im2col_step):
    _check(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step, grad_output)
    calls["backward"] += 1
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (value, sampling_loc, attn_weight)]
        output = ms_deform_attn_reference(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        return list(torch.autograd.grad(output, leaves, grad_output))
