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
in DINO's mixed query selection. Module names follow the official DN-DETR
release: ``transformer.decoder.query_scale.layers.*``,
``transformer.decoder.ref_point_head.layers.*``.
"""
import math

import torch
from torch import nn

from ..util.box_ops import inverse_sigmoid
from .deformable_detr import MLP
from .deformable_transformer import DeformableTransformer, build_deformable_transformer

# DN-DETR uses eps 1e-3 for inverse_sigmoid (Deformable DETR 1e-5); kept so
# its checkpoints reproduce.
ANCHOR_INVERSE_SIGMOID_EPS = 1e-3


def box_sine_embedding(boxes, num_pos_feats=128, temperature=10000):
    """Sine embedding of boxes in [0, 1]: (B, Q, 4) cxcywh -> (B, Q, 4 * num_pos_feats).

    Each coordinate times 2*pi over temperature ** (2 * (i // 2) / num_pos_feats),
    sin on even and cos on odd features (interleaved); concatenated in the
    order y, x, w, h as in DAB-DETR.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    scaled = boxes[..., None] * (2 * math.pi) / dim_t  # (B, Q, 4, F)
    embedded = torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)
    x_embed, y_embed, w_embed, h_embed = embedded.unbind(-2)
    return torch.cat((y_embed, x_embed, w_embed, h_embed), dim=-1)


class AnchorDeformableDecoder(nn.Module):
    """Decoder layers with per-layer positional queries from the current anchor boxes.

    ``bbox_embed`` (one box head per layer), ``refine_boxes`` and, in two-stage,
    ``class_embed`` are attached by the detector, as in DeformableTransformerDecoder.
    """

    def __init__(self, layers, d_model):
        super().__init__()
        self.layers = layers
        self.num_layers = len(layers)
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        for parameter in list(self.query_scale.parameters()) + list(self.ref_point_head.parameters()):
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)  # as the transformer-wide init of the original
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
        Returns hs (D, B, Q, C) and the anchors after each layer (D, B, Q, 4): refined and
        detached when ``refine_boxes``, else the input anchors repeated.
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
            if layer_index > 0:
                query_pos = query_pos * self.query_scale(output)
            output = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask, self_attn_mask)
            if self.refine_boxes:
                delta = self.bbox_embed[layer_index](output)
                reference_points = (delta + inverse_sigmoid(reference_points, ANCHOR_INVERSE_SIGMOID_EPS)).sigmoid()
                reference_points = reference_points.detach()
            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


class AnchorDeformableTransformer(DeformableTransformer):
    """DeformableTransformer whose decoder takes anchor-box queries.

    Drops the single-stage ``reference_points`` projection and the two-stage
    ``pos_trans`` query embedding (anchors and ``tgt_embed`` replace them).

    forward(srcs, masks, pos_embeds, query_content, query_anchors=None, prefix_queries=None,
            self_attn_mask=None)
    -> (hs (D, B, N+Q, C), init_reference (B, N+Q, 4), inter_references (D, B, N+Q, 4),
        enc_outputs_class (B, S, K) or None, enc_outputs_coord_unact (B, S, 4) or None).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.two_stage:
            del self.pos_trans, self.pos_trans_norm
        else:
            del self.reference_points
        self.decoder = AnchorDeformableDecoder(self.decoder.layers, self.d_model)

    def select_anchor_queries(self, encoded, query_content, query_anchors):
        """Matching queries: (tgt (B, Q, C), anchors (B, Q, 4), enc_outputs_class, enc_outputs_coord_unact).

        Single-stage: anchors = sigmoid(query_anchors (Q, 4)). Two-stage: the top-k
        encoder proposals by the first class logit (detached), as in Deformable DETR.
        """
        memory = encoded["memory"]
        batch = memory.shape[0]
        tgt = query_content.unsqueeze(0).expand(batch, -1, -1)
        if not self.two_stage:
            if query_anchors is None:
                raise ValueError("single-stage anchor queries need query_anchors (num_queries, 4) logits")
            return tgt, query_anchors.sigmoid().unsqueeze(0).expand(batch, -1, -1), None, None
        enc_outputs_class, enc_outputs_coord_unact, topk_coords_unact = self.top_proposals(encoded)
        return tgt, topk_coords_unact.sigmoid(), enc_outputs_class, enc_outputs_coord_unact

    def forward(self, srcs, masks, pos_embeds, query_content, query_anchors=None, prefix_queries=None,
                self_attn_mask=None):
        """
        srcs, pos_embeds: lists over levels of (B, C, H_l, W_l); masks: (B, H_l, W_l) bool.
        query_content: (Q, C) content of the matching queries; query_anchors: (Q, 4) anchor
        logits (single-stage) or None (two-stage).
        prefix_queries: None or {``tgt`` (B, N, C), ``reference_points`` (B, N, 4) boxes in [0, 1]}
        decoded before the matching queries (DN).
        self_attn_mask: None or bool (B, N+Q, N+Q), True = blocked (expanded over heads here).
        """
        encoded = self.encode(srcs, masks, pos_embeds)
        tgt, reference_points, enc_outputs_class, enc_outputs_coord_unact = \
            self.select_anchor_queries(encoded, query_content, query_anchors)
        if prefix_queries is not None:
            tgt = torch.cat([prefix_queries["tgt"], tgt], 1)
            reference_points = torch.cat([prefix_queries["reference_points"].to(reference_points), reference_points], 1)
        if self_attn_mask is not None:
            expected = (tgt.shape[0], tgt.shape[1], tgt.shape[1])
            if tuple(self_attn_mask.shape) != expected:
                raise ValueError(f"self_attn_mask must be (B, N+Q, N+Q) = {expected}, got "
                                 f"{tuple(self_attn_mask.shape)}")
            self_attn_mask = self_attn_mask.repeat_interleave(self.nhead, dim=0)
        hs, inter_references = self.decoder(tgt, reference_points, encoded["memory"], encoded["spatial_shapes"],
                                            encoded["level_start_index"], encoded["valid_ratios"], None,
                                            encoded["mask"], self_attn_mask)
        return hs, reference_points, inter_references, enc_outputs_class, enc_outputs_coord_unact


def build_anchor_transformer(cfg):
    return build_deformable_transformer(cfg, AnchorDeformableTransformer)
