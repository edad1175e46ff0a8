"""The deformable decoder: self-attention among the queries, deformable cross-attention into the
encoder memory, optional iterative box refinement between layers.

Post-norm layers as published. The odd norm numbering of the decoder layer (norm2 after the
self-attention, norm1 after the cross-attention) is the original's and fixes the checkpoint keys.
"""
import torch
from torch import nn

from ..ops import MSDeformAttn
from ..util.box_ops import inverse_sigmoid
from .deformable_encoder import clones
from .dropout import Dropout
from .feed_forward import feed_forward


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm: self-attention (norm2), deformable cross-attention (norm1), FFN (norm3).

    The odd norm numbering is the original's and fixes the checkpoint keys.
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4,
                 msda_backend=None):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                src_padding_mask=None, self_attn_mask=None):
        """
        tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 2 or 4) on the padded canvas;
        src: (B, S, C); src_padding_mask: (B, S) bool; self_attn_mask: None or bool
        (Q, Q) / (B * n_heads, Q, Q), True = query i may not attend to query j.
        Returns (B, Q, C).
        """
        q = k = tgt + query_pos
        attended = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1),
                                  attn_mask=self_attn_mask, need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes,
                                   level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = feed_forward(tgt, self.linear1, self.dropout3, self.linear2)
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """Stack of decoder layers returning every layer's output.

    ``bbox_embed`` (a ModuleList of box heads, one per layer) is attached by
    the detector when iterative box refinement is on; ``class_embed`` too in
    two-stage (the last entry scores the encoder proposals). ``refine_boxes``
    says whether ``bbox_embed`` updates the reference points between layers.
    """

    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed = None
        self.class_embed = None
        self.refine_boxes = False

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                src_valid_ratios, query_pos=None, src_padding_mask=None, self_attn_mask=None):
        """
        tgt: (B, Q, C) query content; reference_points: (B, Q, 2) points or (B, Q, 4) boxes,
        sigmoid space, normalised to the valid (unpadded) area; src: (B, S, C) memory;
        src_valid_ratios: (B, L, 2); query_pos: (B, Q, C) or None (zeros).
        Returns hs (num_layers, B, Q, C) and the reference points after each layer
        (num_layers, B, Q, 2 or 4), detached between layers when refining.
        """
        if query_pos is None:
            query_pos = torch.zeros_like(tgt)
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for layer_index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scale = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            else:
                scale = src_valid_ratios
            reference_points_input = reference_points[:, :, None] * scale[:, None]
            output = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask, self_attn_mask)
            if self.refine_boxes:
                delta = self.bbox_embed[layer_index](output).float()
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    # 2-d points become boxes; w, h start from the head's own bias.
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1).sigmoid()
                reference_points = new_reference_points.detach()
            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)
