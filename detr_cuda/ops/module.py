"""The MSDeformAttn layer: projections around the ms_deform_attn operator."""
import contextlib
import math
import warnings

import torch
from torch import nn
import torch.nn.functional as F

from .functional import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the published parameterisation.

    Parameter names and initialisation match the original Deformable DETR
    module, so its checkpoints load unchanged.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, backend=None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(f"MSDeformAttn head dim {head_dim} is not a power of 2; "
                          "the CUDA kernel's fast path prefers multiples of 8", stacklevel=2)
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h points along angle 2*pi*h/n_heads, scaled onto the unit square;
        # point p sits (p + 1) pixels out along that direction on every level.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(
            self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for point in range(self.n_points):
            grid_init[:, :, point, :] *= point + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling_locations(self, query, reference_points, input_spatial_shapes):
        """Where and how much each query samples: (sampling_locations (B, Q, H, L, P, 2) as (x, y) in
        [0, 1] of the padded canvas of each level, attention_weights (B, Q, H, L, P) softmaxed over
        L * P). Arguments as in :meth:`forward`."""
        batch, num_queries, _ = query.shape
        sampling_offsets = self.sampling_offsets(query)  # (B, Q, H * L * P * 2)
        offsets_shape = (batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # One offset unit is one pixel of that level: normalise by (W_l, H_l). The divisor is laid
            # out as the offsets' last dimension (H * L * P * 2), so the division runs over contiguous
            # rows (3x faster than broadcasting (L, 2) into the 6-d view; the same values).
            offset_normalizer = torch.stack(
                [input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1).to(query.dtype)
            per_offset = offset_normalizer[None, :, None, :].expand(
                self.n_heads, self.n_levels, self.n_points, 2).reshape(-1)
            normalized = (sampling_offsets / per_offset).view(offsets_shape)
            # In place, but in the dtype the sum promotes to (float16 offsets + float32 points stay float32).
            sampling_locations = normalized.to(torch.promote_types(normalized.dtype, reference_points.dtype)).add_(
                reference_points[:, :, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # Offsets scale with the box: the init grid's last point lands on its border.
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + sampling_offsets.view(offsets_shape) / self.n_points
                                  * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), "
                             f"got shape {tuple(reference_points.shape)}")
        return sampling_locations, attention_weights

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None):
        """
        Args:
            query: (B, Q, d_model).
            reference_points: (B, Q, n_levels, 2) as (x, y) in [0, 1] of the
                padded canvas, or (B, Q, n_levels, 4) as (cx, cy, w, h) boxes.
            input_flatten: (B, S, d_model), all levels flattened.
            input_spatial_shapes: (n_levels, 2) int64, (H_l, W_l); S must be their sum of H_l * W_l
                (checked by the operator, once per tensor: see geometry.py).
            input_level_start_index: (n_levels,) int64.
            input_padding_mask: (B, S) bool, True at padded positions, or None.
        Returns:
            (B, Q, d_model).
        """
        batch, num_values, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        sampling_locations, attention_weights = self.sampling_locations(query, reference_points,
                                                                        input_spatial_shapes)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                sampling_locations, attention_weights, backend=self.backend)
        return self.output_proj(output)


@contextlib.contextmanager
def msda_backend(model, backend):
    """Points every MSDeformAttn layer of ``model`` at ``backend`` (None = by device) for the
    duration of the ``with`` block, then restores each layer's own."""
    layers = [module for module in model.modules() if isinstance(module, MSDeformAttn)]
    saved = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = backend
    try:
        yield model
    finally:
        for layer, previous in zip(layers, saved):
            layer.backend = previous
