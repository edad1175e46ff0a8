"""Deformable transformer: multi-scale deformable encoder, decoder, two-stage proposals.

Follows the published Deformable DETR (post-norm layers, ReLU FFN, dropout
after attention and inside/after the FFN, no final norms). Module names match
the official checkpoints (``transformer.encoder.layers.N.self_attn...``,
``transformer.decoder.layers.N.cross_attn...``, ``transformer.level_embed``,
``transformer.reference_points`` / ``enc_output`` / ``pos_trans``).

Hooks for DN training (the published path is unchanged when they are unused):
- ``DeformableTransformerDecoderLayer.forward(..., self_attn_mask=None)``: a
  bool (Q, Q) or (B * n_heads, Q, Q) mask, True = blocked, passed to the
  decoder self-attention.
- ``DeformableTransformer.forward(..., prefix_queries=None, self_attn_mask=None)``:
  extra queries (content, reference points, optional positional part) are
  placed *before* the matching queries and decoded together with them.
- ``encode`` / ``select_initial_queries`` / ``decoder`` can be called one by one.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import MSDeformAttn
from ..util.box_ops import inverse_sigmoid


def _get_clones(module, count):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(count)])


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm: src = norm1(src + drop(MSDeformAttn(src + pos))); src = norm2(src + drop(FFN(src)))."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4,
                 msda_backend=None):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """src, pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S) bool."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                  padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device):
        """Pixel centres of every level, normalised to the valid area, expressed on every level.

        spatial_shapes (L, 2) (H_l, W_l); valid_ratios (B, L, 2) (w, h) -> (B, S, L, 2) (x, y).
        """
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
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


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm: self-attention (norm2), deformable cross-attention (norm1), FFN (norm3).

    The odd norm numbering is the original's and fixes the checkpoint keys.
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4,
                 msda_backend=None):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
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
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
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
        self.layers = _get_clones(decoder_layer, num_layers)
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


def proposal_position_embedding(proposals, num_pos_feats=128, temperature=10000):
    """Sine embedding of box logits: (B, K, 4) -> (B, K, 4 * num_pos_feats), interleaved sin/cos."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    proposals = proposals.sigmoid() * scale
    pos = proposals[:, :, :, None] / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


class DeformableTransformer(nn.Module):
    """Encoder + decoder of Deformable DETR, with optional two-stage query selection.

    forward(srcs, masks, pos_embeds, query_embed=None, prefix_queries=None, self_attn_mask=None)
    -> (hs (D, B, Q, C), init_reference (B, Q, 2|4), inter_references (D, B, Q, 2|4),
        enc_outputs_class (B, S, K) or None, enc_outputs_coord_unact (B, S, 4) or None).
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_feature_levels=4, dec_n_points=4,
                 enc_n_points=4, two_stage=False, two_stage_num_proposals=300, msda_backend=None):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, enc_n_points, msda_backend)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, dec_n_points, msda_backend)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask):
        """mask (B, H, W) True = padded -> (B, 2) valid fraction (w, h) (row 0 / column 0 counts)."""
        _, height, width = mask.shape
        valid_height = torch.sum(~mask[:, :, 0], 1)
        valid_width = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """One fixed-size proposal per encoder token (w = h = 0.05 * 2^level).

        Returns output_memory (B, S, C) (padded / invalid tokens zeroed, then
        enc_output + norm) and proposal logits (B, S, 4), +inf where invalid.
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (height, width) in enumerate(spatial_shapes.tolist()):
            mask_level = memory_padding_mask[:, start:start + height * width].view(batch, height, width)
            valid_height = torch.sum(~mask_level[:, :, 0], 1)
            valid_width = torch.sum(~mask_level[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, height - 1, height, dtype=torch.float32, device=memory.device),
                torch.linspace(0, width - 1, width, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.stack([valid_width, valid_height], -1).view(batch, 1, 1, 2).float()
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        output_proposals = torch.cat(proposals, 1)
        output_proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~output_proposals_valid, float("inf"))
        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~output_proposals_valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    def flatten_levels(self, srcs, masks, pos_embeds):
        """Lists over levels of (B, C, H_l, W_l) / (B, H_l, W_l) -> dict of flattened tensors:
        src (B, S, C), mask (B, S), pos (B, S, C) incl. level embedding, spatial_shapes (L, 2),
        level_start_index (L,), valid_ratios (B, L, 2)."""
        if len(srcs) != self.level_embed.shape[0]:
            raise ValueError(f"transformer built for {self.level_embed.shape[0]} feature levels, got {len(srcs)}")
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for level, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=srcs[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        return {
            "src": torch.cat(src_flatten, 1),
            "mask": torch.cat(mask_flatten, 1),
            "pos": torch.cat(pos_flatten, 1),
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": torch.stack([self.get_valid_ratio(m) for m in masks], 1),
        }

    def encode(self, srcs, masks, pos_embeds):
        """Runs the encoder. Returns the flatten_levels dict plus ``memory`` (B, S, C)."""
        inputs = self.flatten_levels(srcs, masks, pos_embeds)
        inputs["memory"] = self.encoder(inputs["src"], inputs["spatial_shapes"], inputs["level_start_index"],
                                        inputs["valid_ratios"], inputs["pos"], inputs["mask"])
        return inputs

    def top_proposals(self, encoded):
        """Two-stage: score every encoder token as a proposal and keep the top-k.

        Returns enc_outputs_class (B, S, K), enc_outputs_coord_unact (B, S, 4) box logits
        (float32), and the top-k box logits (B, k, 4), detached, ranked by the first class
        logit (the encoder head is trained class-agnostically).
        """
        memory = encoded["memory"]
        output_memory, output_proposals = self.gen_encoder_output_proposals(
            memory, encoded["mask"], encoded["spatial_shapes"])
        head_index = self.decoder.num_layers
        enc_outputs_class = self.decoder.class_embed[head_index](output_memory)
        enc_outputs_coord_unact = self.decoder.bbox_embed[head_index](output_memory).float() + output_proposals
        topk = self.two_stage_num_proposals
        if topk > memory.shape[1]:
            raise ValueError(f"two-stage selects {topk} proposals (model.num_queries) but the encoder has only "
                             f"{memory.shape[1]} tokens; use larger images or fewer queries")
        topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
        topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1,
                                         topk_proposals.unsqueeze(-1).repeat(1, 1, 4)).detach()
        return enc_outputs_class, enc_outputs_coord_unact, topk_coords_unact

    def select_initial_queries(self, encoded, query_embed=None):
        """Matching queries: (tgt (B, Q, C), query_pos (B, Q, C), reference_points (B, Q, 2|4),
        enc_outputs_class, enc_outputs_coord_unact).

        Single-stage: query_embed (Q, 2C) is split into query_pos and tgt; the
        reference is sigmoid(reference_points(query_pos)), 2-d. Two-stage: the
        top-k encoder proposals by the first class logit give detached 4-d
        reference boxes, and tgt / query_pos come from their sine embedding.
        """
        memory = encoded["memory"]
        batch = memory.shape[0]
        if not self.two_stage:
            if query_embed is None:
                raise ValueError("single-stage transformer needs query_embed (num_queries, 2 * d_model)")
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            # References stay float32 under autocast: they are coordinates, not features.
            return tgt, query_pos, self.reference_points(query_pos).float().sigmoid(), None, None
        enc_outputs_class, enc_outputs_coord_unact, topk_coords_unact = self.top_proposals(encoded)
        reference_points = topk_coords_unact.sigmoid()
        pos_trans_out = self.pos_trans_norm(self.pos_trans(
            proposal_position_embedding(topk_coords_unact, self.d_model // 2)))
        query_pos, tgt = torch.split(pos_trans_out, self.d_model, dim=2)
        return tgt, query_pos, reference_points, enc_outputs_class, enc_outputs_coord_unact

    def forward(self, srcs, masks, pos_embeds, query_embed=None, prefix_queries=None, self_attn_mask=None):
        """
        srcs, pos_embeds: lists over levels of (B, C, H_l, W_l); masks: (B, H_l, W_l) bool.
        query_embed: (Q, 2C) single-stage, None for two-stage.
        prefix_queries: None, or a dict placed before the matching queries (DN):
            ``tgt`` (B, N, C), ``reference_points`` (B, N, 2|4) sigmoid space (the
            same last size as the matching references), ``query_pos`` (B, N, C) or None (zeros).
        self_attn_mask: None or bool (N+Q, N+Q) / (B * nhead, N+Q, N+Q), True = blocked.
        """
        encoded = self.encode(srcs, masks, pos_embeds)
        tgt, query_pos, reference_points, enc_outputs_class, enc_outputs_coord_unact = \
            self.select_initial_queries(encoded, query_embed)
        if prefix_queries is not None:
            prefix_reference = prefix_queries["reference_points"]
            if prefix_reference.shape[-1] != reference_points.shape[-1]:
                raise ValueError(f"prefix_queries reference_points end in {prefix_reference.shape[-1]} but the "
                                 f"matching queries' end in {reference_points.shape[-1]}; they must agree")
            prefix_pos = prefix_queries.get("query_pos")
            if prefix_pos is None:
                prefix_pos = torch.zeros_like(prefix_queries["tgt"])
            tgt = torch.cat([prefix_queries["tgt"], tgt], 1)
            query_pos = torch.cat([prefix_pos, query_pos], 1)
            reference_points = torch.cat([prefix_reference, reference_points], 1)
        hs, inter_references = self.decoder(tgt, reference_points, encoded["memory"], encoded["spatial_shapes"],
                                            encoded["level_start_index"], encoded["valid_ratios"], query_pos,
                                            encoded["mask"], self_attn_mask)
        return hs, reference_points, inter_references, enc_outputs_class, enc_outputs_coord_unact


def build_deformable_transformer(cfg, transformer_class=None):
    """``transformer_class`` (default DeformableTransformer) built from cfg.model; the anchor-query
    variant passes its subclass."""
    model_cfg = cfg.model
    return (transformer_class or DeformableTransformer)(
        d_model=model_cfg.hidden_dim, nhead=model_cfg.nheads, num_encoder_layers=model_cfg.enc_layers,
        num_decoder_layers=model_cfg.dec_layers, dim_feedforward=model_cfg.dim_feedforward,
        dropout=model_cfg.dropout, num_feature_levels=model_cfg.num_feature_levels,
        dec_n_points=model_cfg.dec_n_points, enc_n_points=model_cfg.enc_n_points,
        two_stage=model_cfg.two_stage, two_stage_num_proposals=model_cfg.num_queries,
        msda_backend=model_cfg.msda_backend)
