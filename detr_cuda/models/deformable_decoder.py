"""The deformable decoder: self-attention among the queries, deformable cross-attention into the
encoder memory, optional iterative box refinement between layers.

Post-norm layers as published. The odd norm numbering of the decoder layer (norm2 after the
self-attention, norm1 after the cross-attention) is the original's and fixes the checkpoint keys.
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..ops import MSDeformAttn
from ..util.box_ops import inverse_sigmoid
from .deformable_encoder import clones
from .dropout import Dropout
from .feed_forward import feed_forward


def attention_bias(mask, batch, heads, dtype):
    """A bool self-attention mask (True = blocked) as the additive float mask that
    scaled_dot_product_attention broadcasts over (B, heads, T, T): 0 where allowed, -inf where
    blocked. mask: (T, T), (B, T, T) (one per image, shared by the heads, kept (B, 1, T, T)) or
    (B * heads, T, T); a float mask is taken as already additive."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask.view(batch, heads, *mask.shape[1:]) if mask.shape[0] == batch * heads else mask[:, None]
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def query_self_attention(attention, query_key, value, mask=None):
    """What ``attention(q, k, v, attn_mask=mask, need_weights=False)`` computes for an
    nn.MultiheadAttention (q = k = ``query_key``), batch first, with a per-image mask broadcast over
    the heads instead of repeated per head: nn.MultiheadAttention takes (B * heads, T, T) and
    autograd then keeps two float copies of it per layer.

    query_key, value: (B, T, C); mask: as :func:`attention_bias` takes it, or its result.
    Returns (B, T, C).
    """
    batch, total, channels = value.shape
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

    def split_heads(x):  # (B, T, C) -> (B, heads, T, C / heads)
        return x.view(batch, total, heads, channels // heads).transpose(1, 2)
    q = split_heads(F.linear(query_key, w_q, b_q))
    k = split_heads(F.linear(query_key, w_k, b_k))
    v = split_heads(F.linear(value, w_v, b_v))
    bias = attention_bias(mask, batch, heads, q.dtype)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                              dropout_p=attention.dropout if attention.training else 0.0)
    return attention.out_proj(attended.transpose(1, 2).reshape(batch, total, channels))


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
        (Q, Q) / (B, Q, Q) / (B * n_heads, Q, Q), True = query i may not attend to query j, or
        that mask already made additive by :func:`attention_bias`.
        Returns (B, Q, C).
        """
        attended = query_self_attention(self.self_attn, tgt + query_pos, tgt, self_attn_mask)
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
