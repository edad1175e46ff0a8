"""DN-Deformable-DETR: Deformable DETR with anchor-box queries and denoising training.

The detector of DN-DETR's ``dn_dab_deformable_detr`` model: the Deformable
DETR backbone, input projections, encoder and cloned heads, with anchor-box
queries (``anchor_decoder``) and, while training with ``cfg.dn.enabled``,
noised ground-truth queries (``dn_queries``). Parameter names match the
official release (box refinement on, as published), so its checkpoints load:
``label_enc.weight`` (K + 1, C - 1), ``tgt_embed.weight`` (Q, C - 1),
``refpoint_embed.weight`` (Q, 4), ``transformer.decoder.query_scale.*``,
``transformer.decoder.ref_point_head.*``, ``class_embed.{0..D-1}``,
``bbox_embed.{0..D-1}`` and ``transformer.decoder.bbox_embed.{0..D-1}``.
"""
import torch
from torch import nn

from .anchor_decoder import ANCHOR_INVERSE_SIGMOID_EPS
from .deformable_detr import DeformableDETR
from .dn_queries import prepare_dn_queries, split_dn_outputs


class AnchorDeformableDETR(DeformableDETR):
    """Deformable DETR with anchor-box queries and optional DN training.

    forward(images (B, 3, H, W), padding_mask (B, H, W) bool, targets=None) -> dict with the
    DeformableDETR keys (pred_logits (B, Q, K), pred_boxes (B, Q, 4), aux_outputs,
    enc_outputs in two-stage) for the Q matching queries only, plus, when training
    with DN (``model.training``, ``dn_cfg.enabled`` and ``targets`` given):
        dn_meta: dict from ``dn_queries.prepare_dn_queries`` (indices of the DN queries and their
            clean targets), or None when no image of the batch has an object;
        dn_outputs (only when dn_meta is not None): {pred_logits (B, P, K), pred_boxes (B, P, 4),
            aux_outputs (if aux_loss): [{pred_logits, pred_boxes}] for decoder layers 0 .. D-2}
            of the P DN queries.
    In eval mode, or without targets, no DN query is built and the outputs do not
    depend on the DN settings.

    Content of a matching query: ``tgt_embed`` (C - 1 channels) + indicator 0; of a DN
    query: ``label_enc`` of its noised label + indicator 1.
    """

    learns_query_embed = False
    reference_eps = ANCHOR_INVERSE_SIGMOID_EPS
    training_only_prefixes = ("label_enc.",)  # the DN label book: no DN queries at inference
    query_type = "anchor"                     # the transformer's query_type this detector needs
    dn_indicator = True                       # DN content = label_enc (C - 1) + indicator channel

    def __init__(self, backbone, transformer, num_classes, num_queries, num_feature_levels,
                 aux_loss=True, with_box_refine=True, two_stage=False, dn_cfg=None):
        if transformer.query_type != self.query_type:
            raise ValueError(f"{type(self).__name__} needs a DeformableTransformer with query_type "
                             f"'{self.query_type}', got '{transformer.query_type}'")
        super().__init__(backbone, transformer, num_classes, num_queries, num_feature_levels,
                         aux_loss=aux_loss, with_box_refine=with_box_refine, two_stage=two_stage)
        self._build_query_embeddings(transformer.d_model, num_classes, num_queries, two_stage)
        self.dn_cfg = dn_cfg

    def _build_query_embeddings(self, hidden_dim, num_classes, num_queries, two_stage):
        """The DN label book, the content queries and (single-stage) the anchor boxes."""
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)
        self.tgt_embed = nn.Embedding(num_queries, hidden_dim - 1)
        if not two_stage:
            self.refpoint_embed = nn.Embedding(num_queries, 4)

    def dn_active(self, targets):
        return self.training and targets is not None and self.dn_cfg is not None and self.dn_cfg.enabled

    def learned_queries(self):
        """The transformer's ``queries``: (content (Q, C) = tgt_embed + indicator 0, anchor logits
        (Q, 4), or None in two-stage: the encoder's proposals)."""
        content = self.tgt_embed.weight
        content = torch.cat([content, content.new_zeros(len(content), 1)], dim=-1)
        if self.training:
            # Keeps label_enc in the graph when a batch has no DN query (DDP needs every
            # parameter used); adds exactly zero.
            content = content + 0.0 * self.label_enc.weight.sum()
        return content, None if self.two_stage else self.refpoint_embed.weight

    def forward(self, images, padding_mask, targets=None):
        use_dn = self.dn_active(targets)
        dn = None
        if use_dn:
            dn = prepare_dn_queries(targets, self.label_enc, self.num_classes, self.num_queries, self.dn_cfg,
                                    indicator=self.dn_indicator)
        prefix = None if dn is None else {"tgt": dn["content"], "reference_points": dn["boxes"]}
        attn_mask = None if dn is None else dn["attn_mask"]
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = \
            self.run_transformer(images, padding_mask, prefix, attn_mask)
        outputs_class, outputs_coord = self.predict(hs, init_reference, inter_references)
        num_dn = 0 if dn is None else dn["dn_meta"]["num_dn_queries"]
        dn_class, outputs_class = split_dn_outputs(outputs_class, num_dn)
        dn_coord, outputs_coord = split_dn_outputs(outputs_coord, num_dn)
        out = self.format_outputs(outputs_class, outputs_coord, enc_outputs_class, enc_outputs_coord_unact)
        if use_dn:
            out["dn_meta"] = None if dn is None else dn["dn_meta"]
            if dn is not None:
                out["dn_outputs"] = {"pred_logits": dn_class[-1], "pred_boxes": dn_coord[-1]}
                if self.aux_loss:
                    out["dn_outputs"]["aux_outputs"] = [{"pred_logits": logits, "pred_boxes": boxes}
                                                        for logits, boxes in zip(dn_class[:-1], dn_coord[:-1])]
        return out


def build_anchor_detr(cfg, backbone, transformer, num_classes):
    """AnchorDeformableDETR from a Config; ``transformer`` a DeformableTransformer with query_type "anchor"."""
    model_cfg = cfg.model
    return AnchorDeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=model_cfg.num_queries,
                                num_feature_levels=model_cfg.num_feature_levels, aux_loss=model_cfg.aux_loss,
                                with_box_refine=model_cfg.with_box_refine, two_stage=model_cfg.two_stage,
                                dn_cfg=cfg.dn)
