"""The deformable transformer: flattened multi-scale levels -> encoder -> query selection -> decoder.

Follows the published Deformable DETR (post-norm layers, ReLU FFN, no final norms). Module names
match the official checkpoints (``transformer.encoder...``, ``transformer.decoder...``,
``transformer.level_embed``, ``transformer.reference_points`` / ``enc_output`` / ``pos_trans``).

How the decoder's matching queries are made (:meth:`DeformableTransformer.select_queries`) depends
on ``query_type`` and ``two_stage``; each builds only the modules it uses:

    "deformable", single-stage  query_embed (Q, 2C) -> content + position; reference points
                                sigmoid(reference_points(position)), 2-d (the published model)
    "deformable", two-stage     the top-k encoder proposals: detached 4-d boxes; content and
                                position from their sine embedding (pos_trans, pos_trans_norm)
    "anchor", single-stage      learned content (Q, C) and learned anchor boxes (Q, 4) logits
                                (DAB / DN-Deformable-DETR); position recomputed from the anchors
                                at every decoder layer (anchor_decoder.py)
    "anchor", two-stage         learned content and the top-k encoder proposals as anchors
                                (mixed query selection on Deformable DETR's two-stage heads)
    "dino" (two-stage only)     DINO: learned content ``tgt_embed`` (Q, C), owned here and passed
                                in by the detector; anchors = the top-k encoder proposals ranked
                                by their best class logit, scored by the transformer's own
                                ``enc_out_class_embed`` / ``enc_out_bbox_embed`` (attached by the
                                detector); DINO's decoder (anchor_decoder.py: no query_scale, a
                                final norm, look forward twice)

Hooks for DN training (the published path is unchanged when they are unused): ``prefix_queries``
are decoded before the matching queries, ``self_attn_mask`` keeps them apart.
"""
import math

import torch
from torch import nn

from ..ops import MSDeformAttn, level_geometry
from ..ops.geometry import level_shapes
from .anchor_decoder import AnchorDeformableDecoder
from .deformable_decoder import DeformableTransformerDecoder, DeformableTransformerDecoderLayer, attention_bias
from .deformable_encoder import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from .position_encoding import sine_features

QUERY_TYPES = ("deformable", "anchor", "dino")


def valid_ratios(mask):
    """mask (B, H, W) True = padded -> (B, 2) valid fraction (w, h) of the map (counted along row 0 /
    column 0, as the images are padded at the bottom and right)."""
    _, height, width = mask.shape
    valid_height = torch.sum(~mask[:, :, 0], 1)
    valid_width = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)


def proposal_position_embedding(proposals, num_pos_feats=128, temperature=10000):
    """Sine embedding of box logits: (B, K, 4) -> (B, K, 4 * num_pos_feats), per coordinate interleaved sin/cos."""
    return sine_features(proposals.sigmoid() * (2 * math.pi), num_pos_feats, temperature).flatten(2)


class DeformableTransformer(nn.Module):
    """Encoder + query selection + decoder (see the module docstring for ``query_type``).

    forward(srcs, masks, pos_embeds, queries=None, prefix_queries=None, self_attn_mask=None)
    -> (hs (D, B, N+Q, C), init_reference (B, N+Q, 2|4), inter_references (D, B, N+Q, 2|4),
        enc_outputs_class (B, S, K) or None, enc_outputs_coord_unact (B, S, 4) or None),
    N = the prefix (DN) queries, 0 without them. With query_type "dino" the two encoder outputs
    are those of the Q selected proposals only, (B, Q, K) and (B, Q, 4) (see :meth:`top_proposals`).
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_feature_levels=4, dec_n_points=4,
                 enc_n_points=4, two_stage=False, two_stage_num_proposals=300, msda_backend=None,
                 query_type="deformable", ffn_recompute="cpu"):
        super().__init__()
        if query_type not in QUERY_TYPES:
            raise ValueError(f"query_type must be one of {QUERY_TYPES}, got {query_type!r}")
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.query_type = query_type
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, enc_n_points, msda_backend, ffn_recompute)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, dec_n_points, msda_backend)
        if query_type == "dino" and not two_stage:
            raise ValueError("query_type 'dino' selects its anchors from the encoder: it needs two_stage=True")
        if query_type == "anchor":
            self.decoder = AnchorDeformableDecoder(decoder_layer, num_decoder_layers, d_model)
        elif query_type == "dino":
            self.decoder = AnchorDeformableDecoder(decoder_layer, num_decoder_layers, d_model, query_scale=False,
                                                   final_norm=True, look_forward_twice=True)
        else:
            self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        if two_stage and query_type == "deformable":
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        if not two_stage and query_type == "deformable":
            self.reference_points = nn.Linear(d_model, 2)
        if query_type == "dino":
            self.tgt_embed = nn.Embedding(two_stage_num_proposals, d_model)
            self.enc_out_class_embed = None   # the detector attaches DINO's proposal heads
            self.enc_out_bbox_embed = None
        self._reset_parameters()

    def _reset_parameters(self):
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        if hasattr(self, "reference_points"):
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    # -- encoder -----------------------------------------------------------------------------------
    def flatten_levels(self, srcs, masks, pos_embeds):
        """Lists over levels of (B, C, H_l, W_l) / (B, H_l, W_l) -> dict of flattened tensors:
        src (B, S, C), mask (B, S), pos (B, S, C) incl. level embedding, spatial_shapes (L, 2),
        level_start_index (L,), valid_ratios (B, L, 2)."""
        if len(srcs) != self.level_embed.shape[0]:
            raise ValueError(f"transformer built for {self.level_embed.shape[0]} feature levels, got {len(srcs)}")
        src_flatten, mask_flatten, pos_flatten = [], [], []
        for level, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        # From the maps' Python sizes: the operator never reads them back from the device.
        spatial_shapes, level_start_index = level_geometry([src.shape[-2:] for src in srcs], srcs[0].device)
        return {
            "src": torch.cat(src_flatten, 1),
            "mask": torch.cat(mask_flatten, 1),
            "pos": torch.cat(pos_flatten, 1),
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": torch.stack([valid_ratios(m) for m in masks], 1),
        }

    def encode(self, srcs, masks, pos_embeds):
        """Runs the encoder. Returns the flatten_levels dict plus ``memory`` (B, S, C)."""
        inputs = self.flatten_levels(srcs, masks, pos_embeds)
        inputs["memory"] = self.encoder(inputs["src"], inputs["spatial_shapes"], inputs["level_start_index"],
                                        inputs["valid_ratios"], inputs["pos"], inputs["mask"])
        return inputs

    # -- two-stage proposals -----------------------------------------------------------------------
    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """One fixed-size proposal per encoder token (w = h = 0.05 * 2^level).

        Returns output_memory (B, S, C) (padded / invalid tokens zeroed, then
        enc_output + norm) and proposal logits (B, S, 4), +inf where invalid.
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (height, width) in enumerate(level_shapes(spatial_shapes)):
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

    def proposal_heads(self):
        """(class head, box head) scoring the encoder's proposals: DINO's ``enc_out_class_embed`` /
        ``enc_out_bbox_embed``, else the detector's extra head pair (index D of its head lists)."""
        if self.query_type == "dino":
            if self.enc_out_class_embed is None or self.enc_out_bbox_embed is None:
                raise ValueError("query_type 'dino': the detector must attach enc_out_class_embed and "
                                 "enc_out_bbox_embed to the transformer")
            return self.enc_out_class_embed, self.enc_out_bbox_embed
        head_index = self.decoder.num_layers
        return self.decoder.class_embed[head_index], self.decoder.bbox_embed[head_index]

    def top_proposals(self, encoded):
        """Two-stage: score every encoder token as a proposal and keep the top-k (k = Q).

        Returns (proposal logits, proposal box logits (float32), top-k box logits (B, k, 4)
        detached). Deformable DETR ranks by the first class logit (its encoder head is trained
        class-agnostically) and returns every token's logits (B, S, K) and box logits (B, S, 4);
        DINO ranks by the best class logit and returns those of the k selected tokens, (B, k, K)
        and (B, k, 4) undetached: its encoder loss is on them, with the real classes.
        """
        memory = encoded["memory"]
        output_memory, output_proposals = self.gen_encoder_output_proposals(
            memory, encoded["mask"], encoded["spatial_shapes"])
        class_head, box_head = self.proposal_heads()
        enc_outputs_class = class_head(output_memory)
        enc_outputs_coord_unact = box_head(output_memory).float() + output_proposals
        topk = self.two_stage_num_proposals
        if topk > memory.shape[1]:
            raise ValueError(f"two-stage selects {topk} proposals (model.num_queries) but the encoder has only "
                             f"{memory.shape[1]} tokens; use larger images or fewer queries")
        dino = self.query_type == "dino"
        scores = enc_outputs_class.amax(-1) if dino else enc_outputs_class[..., 0]
        topk_proposals = torch.topk(scores, topk, dim=1)[1].unsqueeze(-1)
        topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.repeat(1, 1, 4))
        if dino:
            topk_class = torch.gather(enc_outputs_class, 1, topk_proposals.repeat(1, 1, enc_outputs_class.shape[-1]))
            return topk_class, topk_coords_unact, topk_coords_unact.detach()
        return enc_outputs_class, enc_outputs_coord_unact, topk_coords_unact.detach()

    # -- query selection ---------------------------------------------------------------------------
    def select_queries(self, encoded, queries):
        """The matching queries: (tgt (B, Q, C), query_pos (B, Q, C) or None (the anchor decoder
        computes it), reference_points (B, Q, 2|4) in sigmoid space, enc_outputs_class,
        enc_outputs_coord_unact) for ``query_type`` and ``two_stage`` (module docstring).

        queries: "deformable": query_embed (Q, 2C), None in two-stage; "anchor" and "dino": (content
        (Q, C), anchor logits (Q, 4) or None in two-stage).
        """
        batch = encoded["memory"].shape[0]
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            enc_outputs_class, enc_outputs_coord_unact, topk_coords_unact = self.top_proposals(encoded)
        if self.query_type in ("anchor", "dino"):
            content, anchors = queries
            tgt = content.unsqueeze(0).expand(batch, -1, -1)
            if self.two_stage:
                reference_points = topk_coords_unact.sigmoid()
            elif anchors is None:
                raise ValueError("single-stage anchor queries need anchor logits (num_queries, 4)")
            else:
                reference_points = anchors.sigmoid().unsqueeze(0).expand(batch, -1, -1)
            return tgt, None, reference_points, enc_outputs_class, enc_outputs_coord_unact
        if self.two_stage:
            pos_trans_out = self.pos_trans_norm(self.pos_trans(
                proposal_position_embedding(topk_coords_unact, self.d_model // 2)))
            query_pos, tgt = torch.split(pos_trans_out, self.d_model, dim=2)
            return tgt, query_pos, topk_coords_unact.sigmoid(), enc_outputs_class, enc_outputs_coord_unact
        if queries is None:
            raise ValueError("single-stage transformer needs query_embed (num_queries, 2 * d_model)")
        query_pos, tgt = torch.split(queries, self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
        tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
        # References stay float32 under autocast: they are coordinates, not features.
        return tgt, query_pos, self.reference_points(query_pos).float().sigmoid(), None, None

    def add_prefix(self, tgt, query_pos, reference_points, prefix_queries):
        """Places the prefix (DN) queries before the matching ones. prefix_queries: ``tgt`` (B, N, C),
        ``reference_points`` (B, N, 2|4) in [0, 1], the matching queries' last size, and optionally
        ``query_pos`` (B, N, C) (zeros when absent; unused by the anchor decoder)."""
        prefix_reference = prefix_queries["reference_points"]
        if prefix_reference.shape[-1] != reference_points.shape[-1]:
            raise ValueError(f"prefix_queries reference_points end in {prefix_reference.shape[-1]} but the "
                             f"matching queries' end in {reference_points.shape[-1]}; they must agree")
        if query_pos is not None:
            prefix_pos = prefix_queries.get("query_pos")
            if prefix_pos is None:
                prefix_pos = torch.zeros_like(prefix_queries["tgt"])
            query_pos = torch.cat([prefix_pos, query_pos], 1)
        tgt = torch.cat([prefix_queries["tgt"], tgt], 1)
        reference_points = torch.cat([prefix_reference.to(reference_points), reference_points], 1)
        return tgt, query_pos, reference_points

    def attention_bias(self, self_attn_mask, batch, total, dtype):
        """The bool mask (N+Q, N+Q), (B, N+Q, N+Q) or (B * nhead, N+Q, N+Q) checked and made additive
        once for every decoder layer: float (1 or B, 1 or nhead, N+Q, N+Q), -inf where blocked."""
        if self_attn_mask is None:
            return None
        leading = tuple(self_attn_mask.shape[:-2])
        if leading not in ((), (batch,), (batch * self.nhead,)) or tuple(self_attn_mask.shape[-2:]) != (total, total):
            raise ValueError(f"self_attn_mask must be (N+Q, N+Q), (B, N+Q, N+Q) or (B * nhead, N+Q, N+Q) with "
                             f"N+Q = {total}, B = {batch}; got {tuple(self_attn_mask.shape)}")
        return attention_bias(self_attn_mask, batch, self.nhead, dtype)

    def forward(self, srcs, masks, pos_embeds, queries=None, prefix_queries=None, self_attn_mask=None):
        """
        srcs, pos_embeds: lists over levels of (B, C, H_l, W_l); masks: (B, H_l, W_l) bool.
        queries: the detector's learned queries (see :meth:`select_queries`).
        prefix_queries: None, or the N queries decoded before the matching ones (:meth:`add_prefix`).
        self_attn_mask: None or bool (N+Q, N+Q), (B, N+Q, N+Q) or (B * nhead, N+Q, N+Q), True = blocked.
        """
        encoded = self.encode(srcs, masks, pos_embeds)
        tgt, query_pos, reference_points, enc_outputs_class, enc_outputs_coord_unact = \
            self.select_queries(encoded, queries)
        if prefix_queries is not None:
            tgt, query_pos, reference_points = self.add_prefix(tgt, query_pos, reference_points, prefix_queries)
        self_attn_mask = self.attention_bias(self_attn_mask, tgt.shape[0], tgt.shape[1], tgt.dtype)
        hs, inter_references = self.decoder(tgt, reference_points, encoded["memory"], encoded["spatial_shapes"],
                                            encoded["level_start_index"], encoded["valid_ratios"], query_pos,
                                            encoded["mask"], self_attn_mask)
        return hs, reference_points, inter_references, enc_outputs_class, enc_outputs_coord_unact


def build_deformable_transformer(cfg):
    model_cfg = cfg.model
    return DeformableTransformer(
        d_model=model_cfg.hidden_dim, nhead=model_cfg.nheads, num_encoder_layers=model_cfg.enc_layers,
        num_decoder_layers=model_cfg.dec_layers, dim_feedforward=model_cfg.dim_feedforward,
        dropout=model_cfg.dropout, num_feature_levels=model_cfg.num_feature_levels,
        dec_n_points=model_cfg.dec_n_points, enc_n_points=model_cfg.enc_n_points,
        two_stage=model_cfg.two_stage, two_stage_num_proposals=model_cfg.num_queries,
        msda_backend=model_cfg.msda_backend, query_type=model_cfg.query_type,
        ffn_recompute=model_cfg.ffn_recompute)
