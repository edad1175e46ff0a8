"""The Deformable DETR detector: backbone -> input projections -> transformer -> heads."""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..util.box_ops import inverse_sigmoid
from .mlp import MLP


class DeformableDETR(nn.Module):
    """Deformable DETR (single-scale, multi-scale, + box refinement, + two-stage).

    forward(images (B, 3, H, W), padding_mask (B, H, W) bool True = padded, targets=None) -> dict:
        pred_logits (B, Q, K) class logits (sigmoid, no background class),
        pred_boxes (B, Q, 4) (cx, cy, w, h) normalised to each unpadded image,
        aux_outputs: list of {pred_logits, pred_boxes} for decoder layers 0 .. D-2 (if aux_loss),
        enc_outputs: {pred_logits (B, S, K), pred_boxes (B, S, 4)} for the encoder proposals (two-stage).
    ``targets`` is accepted for interface symmetry with DN models and unused here.

    Queries: ``query_embed`` (Q, 2C) in single-stage; none in two-stage (the encoder's proposals).
    Subclasses with other learned queries set ``learns_query_embed = False``, create their own
    parameters and return them from :meth:`learned_queries` (the transformer's ``queries``).

    Heads: without refinement one class head and one box head are shared by
    every decoder layer (the ModuleList repeats the same module, so the state
    dict repeats its keys); with refinement each layer has its own deep copy
    and the decoder holds the same list (keys ``transformer.decoder.bbox_embed.*``).
    Two-stage adds one more head pair (index D) for the encoder proposals.
    """

    learns_query_embed = True
    reference_eps = 1e-5                  # inverse_sigmoid clamp of the reference points (Deformable DETR's)
    training_only_prefixes = ()           # parameters unused at inference (none here)
    encoder_output_key = "enc_outputs"    # where format_outputs puts the two-stage encoder predictions

    def __init__(self, backbone, transformer, num_classes, num_queries, num_feature_levels,
                 aux_loss=True, with_box_refine=False, two_stage=False):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage and self.learns_query_embed:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = self._build_input_proj(backbone, hidden_dim, num_feature_levels)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        prior_prob = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0.0)

        self._attach_heads(transformer, with_box_refine, two_stage)

    def _attach_heads(self, transformer, with_box_refine, two_stage):
        """Turns the freshly initialised ``class_embed`` / ``bbox_embed`` into the per-layer head
        lists (see the class docstring) and gives the decoder the ones it uses."""
        decoder = transformer.decoder
        num_pred = decoder.num_layers + 1 if two_stage else decoder.num_layers
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(self.class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(self.bbox_embed) for _ in range(num_pred))
            # Only the first layer predicts a box from a 2-d point; later layers refine a box.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([self.class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([self.bbox_embed for _ in range(num_pred)])
        if with_box_refine or two_stage:
            decoder.bbox_embed = self.bbox_embed
        decoder.refine_boxes = with_box_refine
        if two_stage:
            decoder.class_embed = self.class_embed
            for box_head in self.bbox_embed:
                # Two-stage references are boxes from the start: no w, h prior.
                nn.init.constant_(box_head.layers[-1].bias[2:], 0.0)

    @staticmethod
    def _build_input_proj(backbone, hidden_dim, num_feature_levels):
        """1x1 conv + GroupNorm(32) per backbone level; 3x3 stride-2 conv + GN for each extra level."""
        in_channels = list(backbone.num_channels)
        projections = [nn.Sequential(nn.Conv2d(channels, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                       for channels in in_channels]
        if num_feature_levels > 1:
            # The first extra level reads raw C5; further ones read the previous projected level.
            channels = in_channels[-1]
            for _ in range(num_feature_levels - len(in_channels)):
                projections.append(nn.Sequential(
                    nn.Conv2d(channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim)))
                channels = hidden_dim
        if len(projections) != num_feature_levels:
            raise ValueError(f"num_feature_levels={num_feature_levels} but the backbone gives "
                             f"{len(in_channels)} levels (use 1, or >= {len(in_channels)})")
        return nn.ModuleList(projections)

    def multi_scale_features(self, images, padding_mask):
        """Projected features, masks and position encodings of every level (lists of L tensors:
        (B, C, H_l, W_l), (B, H_l, W_l), (B, C, H_l, W_l))."""
        if images.dim() != 4 or padding_mask.shape != (images.shape[0],) + images.shape[-2:]:
            raise ValueError(f"expected images (B, 3, H, W) and padding_mask (B, H, W), got "
                             f"{tuple(images.shape)} and {tuple(padding_mask.shape)}")
        features, masks, positions = self.backbone(images, padding_mask.to(torch.bool))
        srcs = [projection(feature) for projection, feature in zip(self.input_proj, features)]
        masks = list(masks)
        positions = list(positions)
        for level in range(len(features), self.num_feature_levels):
            source = features[-1] if level == len(features) else srcs[-1]
            src = self.input_proj[level](source)
            mask = F.interpolate(padding_mask[None].float(), size=src.shape[-2:])[0].to(torch.bool)
            srcs.append(src)
            masks.append(mask)
            positions.append(self.backbone[1](mask).to(src.dtype))
        return srcs, masks, positions

    def predict(self, hs, init_reference, inter_references):
        """Per-layer heads: hs (D, B, Q, C) -> logits (D, B, Q, K), boxes (D, B, Q, 4) sigmoid cxcywh."""
        outputs_classes, outputs_coords = [], []
        for layer in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if layer == 0 else inter_references[layer - 1],
                                        self.reference_eps)
            box_logits = self.bbox_embed[layer](hs[layer]).float()  # boxes in float32 under autocast
            if reference.shape[-1] == 4:
                box_logits = box_logits + reference
            else:
                box_logits = torch.cat([box_logits[..., :2] + reference, box_logits[..., 2:]], -1)
            outputs_classes.append(self.class_embed[layer](hs[layer]))
            outputs_coords.append(box_logits.sigmoid())
        return torch.stack(outputs_classes), torch.stack(outputs_coords)

    def format_outputs(self, outputs_class, outputs_coord, enc_outputs_class=None, enc_outputs_coord_unact=None):
        """Stacked per-layer predictions -> the output dict described in the class docstring."""
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits, "pred_boxes": boxes}
                                  for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])]
        if self.two_stage:
            out[self.encoder_output_key] = {"pred_logits": enc_outputs_class,
                                            "pred_boxes": enc_outputs_coord_unact.sigmoid()}
        return out

    def learned_queries(self):
        """The transformer's ``queries``: query_embed (Q, 2C), or None in two-stage."""
        return None if self.two_stage else self.query_embed.weight

    def run_transformer(self, images, padding_mask, prefix_queries=None, self_attn_mask=None):
        """Backbone + transformer; returns the transformer's 5-tuple (see DeformableTransformer).

        ``prefix_queries`` / ``self_attn_mask`` are the DN hooks, passed through unchanged.
        """
        srcs, masks, positions = self.multi_scale_features(images, padding_mask)
        return self.transformer(srcs, masks, positions, self.learned_queries(), prefix_queries=prefix_queries,
                                self_attn_mask=self_attn_mask)

    def forward(self, images, padding_mask, targets=None):
        hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact = \
            self.run_transformer(images, padding_mask)
        outputs_class, outputs_coord = self.predict(hs, init_reference, inter_references)
        return self.format_outputs(outputs_class, outputs_coord, enc_outputs_class, enc_outputs_coord_unact)
