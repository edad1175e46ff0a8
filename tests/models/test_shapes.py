"""Output shapes of every variant, gradient flow and frozen parameters."""
import pytest
import torch

from detr_cuda.models import build_model
from tests.support.configs import VARIANTS, tiny_model_config
from tests.support.models import padded_batch, random_targets, total_loss

NUM_CLASSES = 5
SIZES = [(96, 128), (80, 100), (64, 120)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes(variant):
    torch.manual_seed(0)
    cfg = tiny_model_config(*VARIANTS[variant])
    model, _, postprocessor = build_model(cfg, NUM_CLASSES)
    images, mask = padded_batch(SIZES)
    outputs = model(images, mask)
    batch, queries = len(SIZES), cfg.model.num_queries
    assert outputs["pred_logits"].shape == (batch, queries, NUM_CLASSES)
    assert outputs["pred_boxes"].shape == (batch, queries, 4)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    assert len(outputs["aux_outputs"]) == cfg.model.dec_layers - 1
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == (batch, queries, NUM_CLASSES)
        assert aux["pred_boxes"].shape == (batch, queries, 4)
    if variant == "two_stage":
        # One proposal per encoder token: strides 8, 16, 32, 64 of the 96 x 128 canvas.
        tokens = 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2
        assert outputs["enc_outputs"]["pred_logits"].shape == (batch, tokens, NUM_CLASSES)
        assert outputs["enc_outputs"]["pred_boxes"].shape == (batch, tokens, 4)
    else:
        assert "enc_outputs" not in outputs
    results = postprocessor(outputs, torch.tensor([[480, 640], [400, 500], [320, 600]]))
    assert len(results) == batch
    for result, (h, w) in zip(results, [(480, 640), (400, 500), (320, 600)]):
        k = min(cfg.eval.num_select, queries * NUM_CLASSES)
        assert result["scores"].shape == (k,)
        assert result["labels"].dtype == torch.int64 and result["labels"].max() < NUM_CLASSES
        assert result["boxes"].shape == (k, 4)
        assert (result["boxes"][:, 2] <= w + 1e-3).all() and (result["boxes"][:, 3] <= h + 1e-3).all()


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_transformer_ignores_padded_tokens(variant):
    """Features at padded positions never reach the decoder output (masked values, valid ratios)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_model_config(*VARIANTS[variant]), NUM_CLASSES)
    model.eval()
    images, mask = padded_batch(SIZES)
    srcs, masks, positions = model.multi_scale_features(images, mask)
    query_embed = None if model.two_stage else model.query_embed.weight
    reference = model.transformer(srcs, masks, positions, query_embed)
    noisy = [src.masked_fill(m[:, None], 0.0) + 5.0 * torch.randn_like(src) * m[:, None]
             for src, m in zip(srcs, masks)]
    clean = [src.masked_fill(m[:, None], 0.0) for src, m in zip(srcs, masks)]
    out_noisy = model.transformer(noisy, masks, positions, query_embed)
    out_clean = model.transformer(clean, masks, positions, query_embed)
    assert any(m.any() for m in masks)
    for a, b in zip(out_noisy[:3], out_clean[:3]):
        assert torch.allclose(a, b, atol=1e-5)
    assert reference[0].shape == out_clean[0].shape


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_gradients_reach_trainable_parameters_only(variant):
    torch.manual_seed(0)
    cfg = tiny_model_config(*VARIANTS[variant])
    model, criterion, _ = build_model(cfg, NUM_CLASSES)
    images, mask = padded_batch(SIZES[:2])
    targets = random_targets([3, 1], NUM_CLASSES)
    loss = total_loss(criterion, criterion(model(images, mask), targets))
    loss.backward()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters()
                      if name.startswith("backbone.0.body.") and not name.startswith(
                          ("backbone.0.body.layer2", "backbone.0.body.layer3", "backbone.0.body.layer4"))}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"no gradient reached {name}"
            assert torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, f"frozen {name} got a gradient"
    # FrozenBatchNorm has buffers only.
    assert not any("bn" in name or "downsample.1" in name for name, _ in model.named_parameters())


def test_backbone_freezing_options():
    model, _, _ = build_model(tiny_model_config("model.train_backbone=false"), NUM_CLASSES)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    model, _, _ = build_model(tiny_model_config("model.freeze_stem_and_layer1=false"), NUM_CLASSES)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


def test_dilation_keeps_stride_16():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_model_config("model.dilation=true", "model.num_feature_levels=1"), NUM_CLASSES)
    images, mask = padded_batch([(64, 96)])
    features, masks, _ = model.multi_scale_features(images, mask)
    assert features[0].shape[-2:] == (4, 6)


def test_initialisation_follows_the_published_model():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_model_config(*VARIANTS["box_refine"]), NUM_CLASSES)
    for head in model.class_embed:
        assert torch.allclose(head.bias, torch.full((NUM_CLASSES,), -4.59512), atol=1e-4)
    for index, head in enumerate(model.bbox_embed):
        assert (head.layers[-1].weight == 0).all()
        expected_wh = -2.0 if index == 0 else 0.0
        assert (head.layers[-1].bias[2:] == expected_wh).all() and (head.layers[-1].bias[:2] == 0).all()
    assert model.class_embed[0] is not model.class_embed[1]
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    shared, _, _ = build_model(tiny_model_config(), NUM_CLASSES)
    assert shared.class_embed[0] is shared.class_embed[1] and shared.bbox_embed[0] is shared.bbox_embed[1]
    assert shared.transformer.decoder.bbox_embed is None
    assert (shared.bbox_embed[0].layers[-1].bias[2:] == -2.0).all()
    two_stage, _, _ = build_model(tiny_model_config(*VARIANTS["two_stage"]), NUM_CLASSES)
    assert all((head.layers[-1].bias == 0).all() for head in two_stage.bbox_embed)
    assert len(two_stage.class_embed) == 3 and two_stage.transformer.decoder.class_embed is two_stage.class_embed
    for projection in model.input_proj:
        assert isinstance(projection[1], torch.nn.GroupNorm) and projection[1].num_groups == 32
        assert (projection[0].bias == 0).all()


def test_bad_input_names_the_shapes():
    model, _, _ = build_model(tiny_model_config(), NUM_CLASSES)
    images, mask = padded_batch([(64, 64)])
    with pytest.raises(ValueError, match="padding_mask"):
        model(images, mask[:, :32])
