"""DINO (Zhang et al. 2022, "DETR with Improved DeNoising Anchor Boxes"): the denoising line finished.

DINO is DN-Deformable-DETR (anchor-box queries, DN training) with contrastive DN, two-stage
proposals and box refinement, plus two pieces of its own:

- mixed query selection: the decoder's initial anchors are the top-k encoder proposals
  (ranked by their best class logit, detached), its content queries the learned
  ``transformer.tgt_embed``, never the encoder features (deformable_transformer.py,
  query_type "dino");
- look forward twice: layer i's box prediction refines the undetached anchor of layer i-1,
  so its loss also trains layer i-1, while the next layer gets the anchor detached; the box
  update inside the decoder reads a layer's output before the decoder's final norm, the heads
  here read it after (anchor_decoder.py).

Parameter names and shapes equal the official release (IDEA-Research/DINO, the ``dino_4scale``
config at its default settings, e.g. ``checkpoint0011_4scale.pth``), so its files load unchanged:

    transformer.tgt_embed.weight (Q, C)            content queries
    transformer.enc_output, enc_output_norm        the proposal projection (as two-stage Deformable DETR)
    transformer.enc_out_class_embed, enc_out_bbox_embed.layers.{0,1,2}
                                                   proposal heads: copies of the decoder heads at init
    transformer.decoder.ref_point_head.layers.{0,1}, transformer.decoder.norm
    class_embed.{0..D-1}, bbox_embed.{0..D-1}      ONE head pair shared by every decoder layer (the
                                                   state dict repeats its keys), also under
                                                   transformer.decoder.{class_embed,bbox_embed}
    label_enc.weight (K + 1, C)                    the DN label book, no indicator channel
There is no query_embed, refpoint_embed, reference_points, query_scale or pos_trans.
"""
import copy

from torch import nn

from .anchor_detr import AnchorDeformableDETR


class DINO(AnchorDeformableDETR):
    """DINO; outputs as AnchorDeformableDETR's (pred_logits (B, Q, K), pred_boxes (B, Q, 4),
    aux_outputs, and dn_meta / dn_outputs on DN training steps), with the encoder's predictions
    for the Q selected proposals under ``interm_outputs``: {pred_logits (B, Q, K), pred_boxes
    (B, Q, 4)}, trained with the real classes (criterion suffix ``_interm``).

    Box refinement and two-stage are always on; every decoder layer shares one class head and
    one box head, as in the official default (``dec_pred_class_embed_share``,
    ``dec_pred_bbox_embed_share``); the box head's w, h bias starts at 0 (the anchors are boxes).
    """

    query_type = "dino"
    dn_indicator = False
    encoder_output_key = "interm_outputs"

    def __init__(self, backbone, transformer, num_classes, num_queries, num_feature_levels, aux_loss=True,
                 dn_cfg=None):
        super().__init__(backbone, transformer, num_classes, num_queries, num_feature_levels, aux_loss=aux_loss,
                         with_box_refine=True, two_stage=True, dn_cfg=dn_cfg)

    def _attach_heads(self, transformer, with_box_refine, two_stage):
        """One class head and one box head for all D decoder layers; own copies for the proposals."""
        class_head, box_head = self.class_embed, self.bbox_embed
        decoder = transformer.decoder
        self.class_embed = nn.ModuleList([class_head for _ in range(decoder.num_layers)])
        self.bbox_embed = nn.ModuleList([box_head for _ in range(decoder.num_layers)])
        decoder.class_embed = self.class_embed
        decoder.bbox_embed = self.bbox_embed
        decoder.refine_boxes = True
        transformer.enc_out_class_embed = copy.deepcopy(class_head)
        transformer.enc_out_bbox_embed = copy.deepcopy(box_head)

    def _build_query_embeddings(self, hidden_dim, num_classes, num_queries, two_stage):
        """Only the DN label book: the content queries are ``transformer.tgt_embed``."""
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim)

    def learned_queries(self):
        """(content (Q, C) = transformer.tgt_embed, None: the anchors are the encoder's proposals)."""
        content = self.transformer.tgt_embed.weight
        if self.training:
            # Keeps label_enc in the graph when a batch has no DN query; adds exactly zero.
            content = content + 0.0 * self.label_enc.weight.sum()
        return content, None


def build_dino(cfg, backbone, transformer, num_classes):
    """DINO from a Config; ``transformer`` a DeformableTransformer with query_type "dino"."""
    model_cfg = cfg.model
    return DINO(backbone, transformer, num_classes=num_classes, num_queries=model_cfg.num_queries,
                num_feature_levels=model_cfg.num_feature_levels, aux_loss=model_cfg.aux_loss, dn_cfg=cfg.dn)
