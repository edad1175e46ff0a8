"""State-dict keys and shapes equal the official Deformable DETR checkpoints (R50, 91 classes).

The expected lists are written from the published architecture (anchors-code.md
section 6.2 and torchvision's ResNet-50 layout, section 6.3), not dumped from our model.
"""
from pathlib import Path

import pytest
import torch

from detr_cuda.config import load_config
from detr_cuda.models import build_model
from tests.support.official_layouts import official_dino_keys

D = 256          # hidden dim
FFN = 1024
LAYERS = 6
CLASSES = 91
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def resnet50_keys():
    keys = {"conv1.weight": (64, 3, 7, 7)}
    keys.update({f"bn1.{n}": (64,) for n in ("weight", "bias", "running_mean", "running_var")})
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}."
            keys[prefix + "conv1.weight"] = (planes, inplanes, 1, 1)
            keys[prefix + "conv2.weight"] = (planes, planes, 3, 3)
            keys[prefix + "conv3.weight"] = (planes * 4, planes, 1, 1)
            for bn, channels in (("bn1", planes), ("bn2", planes), ("bn3", planes * 4)):
                keys.update({f"{prefix}{bn}.{n}": (channels,)
                             for n in ("weight", "bias", "running_mean", "running_var")})
            if block == 0:
                keys[prefix + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update({f"{prefix}downsample.1.{n}": (planes * 4,)
                             for n in ("weight", "bias", "running_mean", "running_var")})
            inplanes = planes * 4
    return keys


def msda_keys(prefix, levels):
    offsets = 8 * levels * 4 * 2
    weights = 8 * levels * 4
    return {prefix + "sampling_offsets.weight": (offsets, D), prefix + "sampling_offsets.bias": (offsets,),
            prefix + "attention_weights.weight": (weights, D), prefix + "attention_weights.bias": (weights,),
            prefix + "value_proj.weight": (D, D), prefix + "value_proj.bias": (D,),
            prefix + "output_proj.weight": (D, D), prefix + "output_proj.bias": (D,)}


def norm(prefix, channels=D):
    return {prefix + "weight": (channels,), prefix + "bias": (channels,)}


def linear(prefix, out_features, in_features):
    return {prefix + "weight": (out_features, in_features), prefix + "bias": (out_features,)}


def box_head(prefix):
    keys = {}
    for index, (out_f, in_f) in enumerate(((D, D), (D, D), (4, D))):
        keys.update(linear(f"{prefix}layers.{index}.", out_f, in_f))
    return keys


def expected_keys(variant):
    """variant: 'deformable', 'box_refine', 'two_stage' (with refinement), 'single_scale'."""
    levels = 1 if variant == "single_scale" else 4
    keys = {"transformer.level_embed": (levels, D)}
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        keys.update(msda_keys(p + "self_attn.", levels))
        keys.update(norm(p + "norm1."))
        keys.update(linear(p + "linear1.", FFN, D))
        keys.update(linear(p + "linear2.", D, FFN))
        keys.update(norm(p + "norm2."))
    for i in range(LAYERS):
        p = f"transformer.decoder.layers.{i}."
        keys.update(msda_keys(p + "cross_attn.", levels))
        keys.update(norm(p + "norm1."))
        keys[p + "self_attn.in_proj_weight"] = (3 * D, D)
        keys[p + "self_attn.in_proj_bias"] = (3 * D,)
        keys.update(linear(p + "self_attn.out_proj.", D, D))
        keys.update(norm(p + "norm2."))
        keys.update(linear(p + "linear1.", FFN, D))
        keys.update(linear(p + "linear2.", D, FFN))
        keys.update(norm(p + "norm3."))
    num_pred = LAYERS + 1 if variant == "two_stage" else LAYERS
    if variant in ("box_refine", "two_stage"):
        for j in range(num_pred):
            keys.update(box_head(f"transformer.decoder.bbox_embed.{j}."))
    if variant == "two_stage":
        for j in range(num_pred):
            keys.update(linear(f"transformer.decoder.class_embed.{j}.", CLASSES, D))
        keys.update(linear("transformer.enc_output.", D, D))
        keys.update(norm("transformer.enc_output_norm."))
        keys.update(linear("transformer.pos_trans.", 2 * D, 2 * D))
        keys.update(norm("transformer.pos_trans_norm.", 2 * D))
    else:
        keys.update(linear("transformer.reference_points.", 2, D))
    for j in range(num_pred):
        keys.update(linear(f"class_embed.{j}.", CLASSES, D))
        keys.update(box_head(f"bbox_embed.{j}."))
    if variant != "two_stage":
        keys["query_embed.weight"] = (300, 2 * D)
    if variant == "single_scale":
        keys.update({"input_proj.0.0.weight": (D, 2048, 1, 1), "input_proj.0.0.bias": (D,)})
        keys.update(norm("input_proj.0.1."))
    else:
        for level, channels in enumerate((512, 1024, 2048)):
            keys.update({f"input_proj.{level}.0.weight": (D, channels, 1, 1), f"input_proj.{level}.0.bias": (D,)})
            keys.update(norm(f"input_proj.{level}.1."))
        keys.update({"input_proj.3.0.weight": (D, 2048, 3, 3), "input_proj.3.0.bias": (D,)})
        keys.update(norm("input_proj.3.1."))
    keys.update({"backbone.0.body." + k: v for k, v in resnet50_keys().items()})
    return keys


OVERRIDES = {
    "deformable": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
    "single_scale": ["model.num_feature_levels=1"],
}


@pytest.mark.parametrize("variant", list(OVERRIDES))
def test_state_dict_matches_official_checkpoint_layout(variant):
    torch.manual_seed(0)
    model, _, _ = build_model(load_config(None, OVERRIDES[variant]), num_classes=CLASSES)
    state = model.state_dict()
    expected = expected_keys(variant)
    assert sorted(set(expected) - set(state)) == []
    assert sorted(set(state) - set(expected)) == []
    mismatched = {k: (tuple(state[k].shape), v) for k, v in expected.items() if tuple(state[k].shape) != v}
    assert mismatched == {}
    assert not any(k.endswith("num_batches_tracked") or k.startswith("backbone.0.body.fc") for k in state)


def test_parameter_counts_match_the_published_sizes():
    """README: 40M (Deformable DETR), 41M (+refine / two-stage), 34M (single-scale), 91 classes."""
    counts = {}
    for variant in ("deformable", "box_refine", "single_scale"):
        model, _, _ = build_model(load_config(None, OVERRIDES[variant]), num_classes=CLASSES)
        counts[variant] = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(counts["deformable"]) == 40
    assert round(counts["box_refine"]) == 41
    assert round(counts["single_scale"]) == 34


@pytest.mark.parametrize("config_name, levels, backbone_channels", [
    ("dino_4scale.yaml", 4, (512, 1024, 2048)),
    ("dino_5scale.yaml", 5, (256, 512, 1024, 2048)),
])
def test_dino_state_dict_matches_the_official_release(config_name, levels, backbone_channels):
    """Keys and shapes of IDEA-Research/DINO's dino model at its defaults (checkpoint0011_4scale.pth and
    its 5-scale sibling; tests/support/official_layouts.py says where each key comes from), and the
    published size: 47M parameters for both."""
    torch.manual_seed(0)
    model, _, _ = build_model(load_config(CONFIGS / config_name), num_classes=CLASSES)
    state = model.state_dict()
    expected = official_dino_keys(levels=levels, backbone_channels=backbone_channels)
    expected.update({"backbone.0.body." + k: v for k, v in resnet50_keys().items()})
    assert sorted(set(expected) - set(state)) == []
    assert sorted(set(state) - set(expected)) == []
    assert {k: (tuple(state[k].shape), v) for k, v in expected.items() if tuple(state[k].shape) != v} == {}
    # One head pair shared by every decoder layer (official dec_pred_*_embed_share), copies for the proposals.
    assert model.class_embed[0] is model.class_embed[5] is model.transformer.decoder.class_embed[3]
    assert model.transformer.enc_out_class_embed is not model.class_embed[0]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 47
