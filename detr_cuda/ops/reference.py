"""Pure-PyTorch multi-scale deformable attention (the reference backend).

Built on ``F.grid_sample(align_corners=False, padding_mode="zeros")``, which is
the sampling convention of the original CUDA kernel: the pixel coordinate of a
normalised location ``x`` on a map of width ``W`` is ``x * W - 0.5`` and
samples outside the map read zeros. Differentiable by autograd; used to check
the compiled kernels and as the fallback when they are not built.
"""
import torch
import torch.nn.functional as F

from .geometry import level_shapes


def ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                             sampling_locations, attention_weights):
    """
    Args:
        value: (B, S, H, C), S = sum over levels of H_l * W_l.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level in S (unused here:
            levels are taken in order, as spatial_shapes implies).
        sampling_locations: (B, Q, H, L, P, 2), (x, y) normalised to [0, 1].
        attention_weights: (B, Q, H, L, P).
    Returns:
        output: (B, Q, H * C).
    """
    batch, _, num_heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    value_per_level = value.split([height * width for height, width in shapes], dim=1)
    # A NaN or infinite location samples nothing (zeros, zero gradient), as in the compiled kernels,
    # where it fails their inside-the-map test: here it is moved far outside the map.
    grids = torch.where(torch.isfinite(sampling_locations), 2 * sampling_locations - 1,
                        sampling_locations.new_full((), -3.0))
    sampled_per_level = []
    for level, (height, width) in enumerate(shapes):
        # (B, H_l*W_l, heads, C) -> (B*heads, C, H_l, W_l)
        value_map = value_per_level[level].flatten(2).transpose(1, 2).reshape(
            batch * num_heads, channels, height, width)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*heads, C, Q, P)
        sampled_per_level.append(F.grid_sample(
            value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B, Q, heads, L, P) -> (B*heads, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * channels, num_queries).transpose(1, 2).contiguous()
