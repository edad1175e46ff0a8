"""The deformable encoder: multi-scale deformable self-attention over every pixel of every level.

Post-norm layers as published (dropout after the attention and inside/after the ReLU FFN); module
names match the official checkpoints (``transformer.encoder.layers.N.self_attn...``).
"""
import copy

import torch
from torch import nn

from ..ops import MSDeformAttn
from ..ops.geometry import level_shapes
from .dropout import Dropout
from .feed_forward import feed_forward


def clones(module, count):
    """``count`` deep copies of ``module`` in a ModuleList (keys ``.0`` .. ``.count-1``)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(count)])


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm: src = norm1(src + drop(MSDeformAttn(src + pos))); src = norm2(src + drop(FFN(src))).
    ``ffn_recompute``: "cpu", "always" or "never": where the FFN keeps no hidden activation for the
    backward when there is no dropout (see :mod:`.feed_forward`)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4,
                 msda_backend=None, ffn_recompute="cpu"):
        super().__init__()
        if ffn_recompute not in ("cpu", "always", "never"):
            raise ValueError(f"ffn_recompute must be 'cpu', 'always' or 'never', got {ffn_recompute!r}")
        self.ffn_recompute = ffn_recompute
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S) bool."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                  padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        recompute = self.ffn_recompute == "always" or (self.ffn_recompute == "cpu" and src.device.type == "cpu")
        ffn = feed_forward(src, self.linear1, self.dropout2, self.linear2, recompute)
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    """Stack of encoder layers over the flattened levels: src (B, S, C) -> memory (B, S, C)."""

    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        """Pixel centres of every level, normalised to the valid area, expressed on every level.

        spatial_shapes (L, 2) (H_l, W_l); valid_ratios (B, L, 2) (w, h) -> (B, S, L, 2) (x, y).
        """
        per_level = []
        for level, (height, width) in enumerate(level_shapes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device),
                torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device), indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask=None):
        """src, pos: (B, S, C) -> memory (B, S, C)."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output
