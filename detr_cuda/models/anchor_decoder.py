"""Anchor-box queries (DAB-Deformable-DETR style) for the deformable transformer.

Each matching query is a content vector plus a 4-d anchor box (cx, cy, w, h).
At every decoder layer the query's positional part is recomputed from its
current anchor: a sine embedding of the box -> ``ref_point_head`` MLP, scaled
by ``query_scale(content)`` from the second layer on. With box refinement
(the published DN-Deformable-DETR) each layer's box head moves the anchor,
detached between layers; without it the anchors stay fixed and every layer
predicts relative to them.

Anchors are learned (``refpoint_embed`` on the detector) or, in two-stage, the
top-k encoder proposals; content is learned (``tgt_embed``) in both cases, as
in DINO's mixed query selection (DeformableTransformer with query_type
"anchor" or "dino" picks them). Module names follow the official DN-DETR release:
``transformer.decoder.query_scale.layers.*``, ``transformer.decoder.ref_point_head.layers.*``.

DINO's decoder (official DINO ``models/dino/deformable_transformer.py``, TransformerDecoder
at its default settings) is the same loop with three differences, each a constructor flag:
no ``query_scale`` (the positional query is ref_point_head(sine(anchor)) on every layer), a
final LayerNorm ``norm`` applied to every layer's output before it is returned (the box
update between layers reads the output before that norm, the detector's heads read it after),
and "look forward twice": the anchor passed on to the next layer is detached, but the one
returned for layer i's box prediction is not, so layer i's box loss also trains layer i-1.
"""
import math

import torch
from torch import nn

from ..util.box_ops import inverse_sigmoid
from .deformable_encoder import clones
from .mlp import MLP
from .position_encoding import sine_features

# DN-DETR uses eps 1e-3 for inverse_sigmoid (Deformable DETR 1e-5); kept so
# its checkpoints reproduce.
ANCHOR_INVERSE_SIGMOID_EPS = 1e-3


def box_sine_embedding(boxes, num_pos_feats=128, temperature=10000):
    """Sine embedding of boxes in [0, 1]: (B, Q, 4) cxcywh -> (B, Q, 4 * num_pos_feats).

    Each coordinate times 2*pi over temperature ** (2 * (i // 2) / num_pos_feats),
    sin on even and cos on odd features (interleaved); concatenated in the
    order y, x, w, h as in DAB-DETR.
    """
    embedded = sine_features(boxes * (2 * math.pi), num_pos_feats, temperature)  # (B, Q, 4, F)
    x_embed, y_embed, w_embed, h_embed = embedded.unbind(-2)
    return torch.cat((y_embed, x_embed, w_embed, h_embed), dim=-1)


class AnchorDeformableDecoder(nn.Module):
    """Decoder layers with per-layer positional queries from the current anchor boxes.

    ``bbox_embed`` (one box head per layer), ``refine_boxes`` and, in two-stage,
    ``class_embed`` are attached by the detector, as in DeformableTransformerDecoder.

    query_scale: DN-DETR's ``query_scale`` MLP on the content (False: DINO).
    final_norm: a LayerNorm ``norm`` on every returned layer output (True: DINO).
    look_forward_twice: return the undetached refined anchors (True: DINO); the next layer
        always gets them detached.
    """

    def __init__(self, decoder_layer, num_layers, d_model, query_scale=True, final_norm=False,
                 look_forward_twice=False):
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2) if query_scale else None
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model) if final_norm else None
        for head in (self.query_scale, self.ref_point_head):
            for parameter in head.parameters() if head is not None else ():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)  # as the transformer-wide init of the original
        self.look_forward_twice = look_forward_twice
        self.bbox_embed = None
        self.class_embed = None
        self.refine_boxes = False

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                src_valid_ratios, query_pos=None, src_padding_mask=None, self_attn_mask=None):
        """
        tgt: (B, Q, C) content; reference_points: (B, Q, 4) anchor boxes, sigmoid space,
        normalised to the valid area; src: (B, S, C) memory; src_valid_ratios: (B, L, 2);
        query_pos: must be None (computed here); self_attn_mask: None or bool (Q, Q) /
        (B * n_heads, Q, Q), True = blocked.
        Returns hs (D, B, Q, C) (after ``norm`` when it exists) and the anchors after each layer
        (D, B, Q, 4): refined when ``refine_boxes`` (detached unless ``look_forward_twice``), else
        the input anchors repeated.
        """
        if query_pos is not None:
            raise ValueError("AnchorDeformableDecoder computes query_pos from the anchors; pass None")
        if reference_points.shape[-1] != 4:
            raise ValueError(f"anchor queries need (B, Q, 4) boxes, got {tuple(reference_points.shape)}")
        if self.refine_boxes and self.bbox_embed is None:
            raise ValueError("AnchorDeformableDecoder refines boxes but has no bbox_embed attached")
        output = tgt
        intermediate, intermediate_reference_points = [], []
        valid_scale = torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None]
        for layer_index, layer in enumerate(self.layers):
            reference_points_input = reference_points[:, :, None] * valid_scale  # (B, Q, L, 4)
            query_sine = box_sine_embedding(reference_points_input[:, :, 0], self.d_model // 2)
            query_pos = self.ref_point_head(query_sine)
            if layer_index > 0 and self.query_scale is not None:
                query_pos = query_pos * self.query_scale(output)
            output = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask, self_attn_mask)
            returned_reference = reference_points
            if self.refine_boxes:
                delta = self.bbox_embed[layer_index](output)
                refined = (delta + inverse_sigmoid(reference_points, ANCHOR_INVERSE_SIGMOID_EPS)).sigmoid()
                reference_points = refined.detach()
                returned_reference = refined if self.look_forward_twice else reference_points
            intermediate.append(output if self.norm is None else self.norm(output))
            intermediate_reference_points.append(returned_reference)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)
