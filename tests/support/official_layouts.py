"""State-dict layouts of official releases, written out from their code's module structure (not
dumped from our model), for the key tests and for building official-layout files in the tools tests.

official_dn_deformable_keys: IDEA-Research/DN-DETR's dn_dab_deformable_detr (anchors-code.md 6.2, 6.4).

official_dino_keys: IDEA-Research/DINO at commit faa8520 (anchors-code.md [DINO]), model ``dino``
built by ``config/DINO/DINO_4scale.py`` (``DINO_5scale.py``: five levels) at its defaults, read
from ``models/dino/dino.py`` (DINO.__init__) and ``models/dino/deformable_transformer.py``:

- the transformer registers its encoder (post-norm deformable layers: self_attn, norm1, linear1,
  linear2, norm2), its decoder (layers with cross_attn / norm1 / self_attn (nn.MultiheadAttention)
  / norm2 / linear1 / linear2 / norm3; the final LayerNorm ``norm``; ``ref_point_head`` =
  MLP(2C -> C -> C); no ``query_scale``, removed by the builder's default rm_dec_query_scale;
  no ``query_pos_sine_scale`` / ``ref_anchor_head``, both only for non-deformable decoders),
  ``level_embed`` (L, C), ``tgt_embed`` (Q, C) (two_stage_type "standard" with embed_init_tgt),
  ``enc_output`` + ``enc_output_norm`` (the proposal projection); no refpoint_embed (two-stage);
- DINO registers ``label_enc`` = Embedding(dn_labelbook_size + 1, C) (91 + 1 rows, no indicator
  channel), ``input_proj`` (1x1 conv + GN per backbone level, 3x3 stride-2 conv + GN for the
  extra level, which reads C5), the backbone (``backbone.0.body`` ResNet without fc), and one
  class head Linear(C, K) and one box head MLP(C, C, 4, 3) repeated over the D decoder layers
  (dec_pred_*_embed_share True): ``class_embed.{j}``, ``bbox_embed.{j}`` and, the same lists
  attached to the decoder, ``transformer.decoder.{class_embed,bbox_embed}.{j}``;
- two_stage_*_embed_share False: deep copies of the two heads as
  ``transformer.enc_out_class_embed`` and ``transformer.enc_out_bbox_embed``.
"""
import argparse
import re

import torch


class Layout:
    """A growing {key: shape} dict with the builders of the modules every deformable model shares."""

    def __init__(self, hidden, heads, levels, points):
        self.hidden, self.heads, self.levels, self.points = hidden, heads, levels, points
        self.keys = {"transformer.level_embed": (levels, hidden)}

    def linear(self, prefix, out_features, in_features):
        self.keys[prefix + ".weight"] = (out_features, in_features)
        self.keys[prefix + ".bias"] = (out_features,)

    def norm(self, prefix):
        self.keys[prefix + ".weight"] = (self.hidden,)
        self.keys[prefix + ".bias"] = (self.hidden,)

    def msda(self, prefix):
        sampling = self.heads * self.levels * self.points
        self.linear(prefix + ".sampling_offsets", sampling * 2, self.hidden)
        self.linear(prefix + ".attention_weights", sampling, self.hidden)
        self.linear(prefix + ".value_proj", self.hidden, self.hidden)
        self.linear(prefix + ".output_proj", self.hidden, self.hidden)

    def box_head(self, prefix):
        self.linear(prefix + ".layers.0", self.hidden, self.hidden)
        self.linear(prefix + ".layers.1", self.hidden, self.hidden)
        self.linear(prefix + ".layers.2", 4, self.hidden)

    def encoder_and_decoder_layers(self, enc_layers, dec_layers, ffn):
        """Post-norm deformable encoder layers and decoder layers (Deformable DETR's names)."""
        hidden = self.hidden
        for i in range(enc_layers):
            prefix = f"transformer.encoder.layers.{i}"
            self.msda(prefix + ".self_attn")
            self.norm(prefix + ".norm1")
            self.linear(prefix + ".linear1", ffn, hidden)
            self.linear(prefix + ".linear2", hidden, ffn)
            self.norm(prefix + ".norm2")
        for i in range(dec_layers):
            prefix = f"transformer.decoder.layers.{i}"
            self.msda(prefix + ".cross_attn")
            self.norm(prefix + ".norm1")
            self.keys[prefix + ".self_attn.in_proj_weight"] = (3 * hidden, hidden)
            self.keys[prefix + ".self_attn.in_proj_bias"] = (3 * hidden,)
            self.linear(prefix + ".self_attn.out_proj", hidden, hidden)
            self.norm(prefix + ".norm2")
            self.linear(prefix + ".linear1", ffn, hidden)
            self.linear(prefix + ".linear2", hidden, ffn)
            self.norm(prefix + ".norm3")

    def input_proj(self, backbone_channels):
        """1x1 conv + GN per backbone level; 3x3 stride-2 conv + GN per extra level (the first reads C5)."""
        for level, channels in enumerate(backbone_channels):
            self.keys[f"input_proj.{level}.0.weight"] = (self.hidden, channels, 1, 1)
            self.keys[f"input_proj.{level}.0.bias"] = (self.hidden,)
        for level in range(len(backbone_channels), self.levels):
            first_extra = level == len(backbone_channels)
            self.keys[f"input_proj.{level}.0.weight"] = (self.hidden, backbone_channels[-1] if first_extra
                                                         else self.hidden, 3, 3)
            self.keys[f"input_proj.{level}.0.bias"] = (self.hidden,)
        for level in range(self.levels):
            self.norm(f"input_proj.{level}.1")


def official_dn_deformable_keys(num_classes=91, hidden=256, ffn=2048, layers=6, queries=300, levels=4,
                                heads=8, points=4, backbone_channels=(512, 1024, 2048)):
    """Non-backbone keys -> shapes of the official DN-DAB-Deformable-DETR (anchors-code.md sections 6.2
    and 6.4): cloned heads per layer, the DN indicator channel in label_enc / tgt_embed."""
    layout = Layout(hidden, heads, levels, points)
    layout.encoder_and_decoder_layers(layers, layers, ffn)
    layout.linear("transformer.decoder.query_scale.layers.0", hidden, hidden)
    layout.linear("transformer.decoder.query_scale.layers.1", hidden, hidden)
    layout.linear("transformer.decoder.ref_point_head.layers.0", hidden, 2 * hidden)
    layout.linear("transformer.decoder.ref_point_head.layers.1", hidden, hidden)
    for j in range(layers):
        layout.box_head(f"transformer.decoder.bbox_embed.{j}")
        layout.box_head(f"bbox_embed.{j}")
        layout.linear(f"class_embed.{j}", num_classes, hidden)
    layout.keys["label_enc.weight"] = (num_classes + 1, hidden - 1)
    layout.keys["tgt_embed.weight"] = (queries, hidden - 1)
    layout.keys["refpoint_embed.weight"] = (queries, 4)
    layout.input_proj(backbone_channels)
    return layout.keys


def official_dino_keys(num_classes=91, hidden=256, ffn=2048, enc_layers=6, dec_layers=6, queries=900, levels=4,
                       heads=8, points=4, backbone_channels=(512, 1024, 2048)):
    """Non-backbone keys -> shapes of the official DINO model with these sizes (defaults: DINO-4scale
    R50 on COCO's 91-id head; DINO-5scale: levels=5, backbone_channels=(256, 512, 1024, 2048))."""
    layout = Layout(hidden, heads, levels, points)
    layout.encoder_and_decoder_layers(enc_layers, dec_layers, ffn)
    layout.norm("transformer.decoder.norm")
    layout.linear("transformer.decoder.ref_point_head.layers.0", hidden, 2 * hidden)
    layout.linear("transformer.decoder.ref_point_head.layers.1", hidden, hidden)
    layout.keys["transformer.tgt_embed.weight"] = (queries, hidden)
    layout.linear("transformer.enc_output", hidden, hidden)
    layout.norm("transformer.enc_output_norm")
    layout.linear("transformer.enc_out_class_embed", num_classes, hidden)
    layout.box_head("transformer.enc_out_bbox_embed")
    for j in range(dec_layers):
        for owner in ("", "transformer.decoder."):
            layout.linear(f"{owner}class_embed.{j}", num_classes, hidden)
            layout.box_head(f"{owner}bbox_embed.{j}")
    layout.keys["label_enc.weight"] = (num_classes + 1, hidden)
    layout.input_proj(backbone_channels)
    return layout.keys


def official_dino_file(model, num_classes=91, generator=None, **sizes):
    """A file in the official DINO layout for ``model``'s sizes: the keys of
    :func:`official_dino_keys` with random values (every decoder layer's head entries holding
    layer 0's tensors, as a saved shared module does) plus ``model``'s backbone tensors, as the
    ``model`` entry beside the release's ``epoch`` and ``args`` (an argparse.Namespace)."""
    keys = official_dino_keys(num_classes, **sizes)
    state = {key: torch.randn(shape, generator=generator) * 0.02 for key, shape in keys.items()}
    for key in keys:
        state[key] = state[re.sub(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.\d+\.", r"\2.0.", key)]
    state.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")})
    return {"model": state, "epoch": 11, "args": argparse.Namespace(modelname="dino", num_classes=num_classes)}
