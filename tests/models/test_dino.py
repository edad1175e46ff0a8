"""DINO: look forward twice, mixed query selection, the final norm, DN on its decoder, its losses."""
import copy
import math
import os

import pytest
import torch
from torch import nn

from detr_cuda.config import ConfigError, load_config
from detr_cuda.models import build_model
from detr_cuda.models.dn_queries import prepare_dn_queries
from detr_cuda.util.box_ops import inverse_sigmoid
from tests.models.test_dn_model import NUM_CLASSES, batch, weighted
from tests.support.configs import DINO
from tests.support.models import fit, seeded_model

# Frozen 1/4-width ResNet-18, three levels (84 encoder tokens at 64 px for the 10 proposals),
# hidden 32, 1 encoder and 3 decoder layers (so that layer i-2, i-1 and i all exist).
TINY_DINO = ["model.backbone=resnet18", "model.backbone_width=16", "model.train_backbone=false",
             "model.num_feature_levels=3", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
             "model.dec_layers=3", "model.dim_feedforward=64", "model.num_queries=10", "model.dropout=0.0",
             "model.enc_n_points=2", "model.dec_n_points=2"] + DINO
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_dino(*overrides, seed=0):
    return seeded_model(TINY_DINO + list(overrides), NUM_CLASSES, seed)


def randomise_box_heads(model, seed=0):
    """The box heads start with a zero last layer (no update at all); give them one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in list(model.bbox_embed) + [model.transformer.enc_out_bbox_embed]:
            head.layers[-1].weight.copy_(torch.randn(head.layers[-1].weight.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_layer_i_box_loss_reaches_layer_i_minus_1_box_head_only_when_looking_forward_twice(look_forward_twice):
    _, model, _ = tiny_dino("dn.enabled=false")
    # One box head per layer (DINO shares one) so that a gradient tells which layer's head it passed.
    heads = nn.ModuleList(copy.deepcopy(model.bbox_embed[0]) for _ in range(len(model.bbox_embed)))
    model.bbox_embed = model.transformer.decoder.bbox_embed = heads
    model.transformer.decoder.look_forward_twice = look_forward_twice
    model.train()
    images, mask, _ = batch([1, 2])
    for layer in range(3):
        model.zero_grad()
        outputs = model(images, mask)
        (outputs["aux_outputs"] + [outputs])[layer]["pred_boxes"].sum().backward()
        reached = [j for j, head in enumerate(heads)
                   if head.layers[-1].weight.grad is not None and head.layers[-1].weight.grad.abs().sum() > 0]
        # Layer i predicts from the anchor layer i-1 refined: with look forward twice that anchor
        # is not detached, so layer i's loss also trains head i-1 (never i-2).
        assert reached == ([layer - 1, layer] if look_forward_twice and layer > 0 else [layer])


def test_the_box_update_reads_the_output_before_the_final_norm_and_the_heads_after():
    _, model, _ = tiny_dino("dn.enabled=false")
    randomise_box_heads(model)
    decoder = model.transformer.decoder
    with torch.no_grad():  # a trained norm: at init it would repeat the layers' own last LayerNorm
        decoder.norm.weight.uniform_(0.5, 1.5)
        decoder.norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    before_norm = []
    hooks = [layer.register_forward_hook(lambda module, inputs, output: before_norm.append(output))
             for layer in decoder.layers]
    images, mask, _ = batch([1, 2])
    with torch.no_grad():
        hs, init_reference, inter_references, _, _ = model.run_transformer(images, mask)
        predicted = model(images, mask)
    for hook in hooks:
        hook.remove()
    reference = init_reference
    for i in range(decoder.num_layers):
        output = before_norm[i]
        torch.testing.assert_close(hs[i], decoder.norm(output))
        updated = (model.bbox_embed[i](output) + inverse_sigmoid(reference, 1e-3)).sigmoid()
        torch.testing.assert_close(inter_references[i], updated)
        from_normed = (model.bbox_embed[i](hs[i]) + inverse_sigmoid(reference, 1e-3)).sigmoid()
        assert (from_normed - updated).abs().max() > 1e-3  # the two readings differ: the check is sensitive
        boxes = predicted["pred_boxes"] if i == decoder.num_layers - 1 else predicted["aux_outputs"][i]["pred_boxes"]
        torch.testing.assert_close(boxes, from_normed)
        reference = inter_references[i]


def test_mixed_query_selection_learned_content_detached_top_proposals_by_best_class():
    _, model, _ = tiny_dino("dn.enabled=false")
    randomise_box_heads(model)
    with torch.no_grad():
        model.transformer.enc_out_class_embed.weight.mul_(20)  # classes disagree on the ranking
    model.train()
    transformer = model.transformer
    captured = []
    hook = transformer.decoder.register_forward_pre_hook(lambda module, args: captured.append(args[:2]))
    first, second = batch([1, 2], seed=0), batch([2, 2], seed=1)
    outputs = [model(images, mask) for images, mask, _ in (first, second)]
    hook.remove()
    (content_a, anchors_a), (content_b, anchors_b) = captured
    # Content: the learned tgt_embed for every image, whatever the encoder saw.
    assert torch.equal(content_a, content_b)
    assert torch.equal(content_a[1], transformer.tgt_embed.weight)
    # Anchors: the selected proposals' boxes, image-dependent and detached.
    assert not torch.equal(anchors_a, anchors_b)
    assert not anchors_a.requires_grad and outputs[0]["interm_outputs"]["pred_boxes"].requires_grad
    torch.testing.assert_close(anchors_a, outputs[0]["interm_outputs"]["pred_boxes"].detach())
    # Selected by the best class logit of every encoder token.
    with torch.no_grad():
        images, mask, _ = first
        encoded = transformer.encode(*model.multi_scale_features(images, mask))
        memory, _ = transformer.gen_encoder_output_proposals(encoded["memory"], encoded["mask"],
                                                             encoded["spatial_shapes"])
        logits = transformer.enc_out_class_embed(memory)
    best = torch.topk(logits.amax(-1), 10, dim=1)[1]
    expected = torch.gather(logits, 1, best[..., None].expand(-1, -1, NUM_CLASSES))
    torch.testing.assert_close(outputs[0]["interm_outputs"]["pred_logits"].detach(), expected)
    assert not torch.equal(best.sort(1)[0], torch.topk(logits[..., 0], 10, dim=1)[1].sort(1)[0])


def test_dino_dn_content_is_the_label_embedding_without_an_indicator():
    cfg, model, _ = tiny_dino("dn.label_noise_ratio=0")
    _, _, targets = batch([2, 1])
    dn = prepare_dn_queries(targets, model.label_enc, NUM_CLASSES, model.num_queries, cfg.dn, indicator=False)
    assert model.label_enc.weight.shape == (NUM_CLASSES + 1, 32)
    image, slot = dn["dn_meta"]["positive_index"]
    torch.testing.assert_close(dn["content"][image, slot], model.label_enc(dn["dn_meta"]["target_labels"]))


def test_eval_outputs_do_not_depend_on_dn_settings():
    _, plain, _ = tiny_dino("dn.enabled=false", seed=0)
    _, with_dn, _ = tiny_dino("dn.box_noise_scale=1.0", "dn.max_dn_queries=60", seed=1)
    with_dn.load_state_dict(plain.state_dict(), strict=True)
    images, mask, targets = batch([2, 3])
    plain.eval(), with_dn.eval()
    with torch.no_grad():
        expected, got = plain(images, mask), with_dn(images, mask, targets)
    assert "dn_outputs" not in got and "dn_meta" not in got
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(got[key], expected[key])
        assert torch.equal(got["interm_outputs"][key], expected["interm_outputs"][key])


def test_matching_outputs_unchanged_by_dn_queries_in_training():
    _, model, _ = tiny_dino()
    model.train()
    images, mask, targets = batch([3, 0, 1])
    with_dn = model(images, mask, targets)
    assert with_dn["dn_outputs"]["pred_logits"].shape == (3, 4 * 6, NUM_CLASSES)  # 24 // (2 * 3) groups of 6
    without_dn = model(images, mask)
    torch.testing.assert_close(with_dn["pred_logits"], without_dn["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without_dn["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_encoder_loss_uses_the_real_classes():
    _, model, criterion = tiny_dino()
    assert {"loss_ce_interm", "loss_bbox_interm", "loss_giou_interm"} <= set(criterion.weight_dict)
    assert not any(key.endswith("_enc") for key in criterion.weight_dict)
    model.train()
    images, mask, targets = batch([2, 1])
    outputs = model(images, mask, targets)
    relabelled = [dict(t, labels=(t["labels"] + 1) % NUM_CLASSES) for t in targets]
    with torch.no_grad():
        losses, other = criterion(outputs, targets), criterion(outputs, relabelled)
    assert losses["loss_ce_interm"] != other["loss_ce_interm"]  # class-aware (a binary target would not care)


@pytest.mark.parametrize("contrastive", [False, True])
def test_dn_on_the_dino_decoder_overfits_a_few_images(contrastive):
    _, model, criterion = tiny_dino(f"dn.contrastive={str(contrastive).lower()}", "model.dec_layers=2")
    history = fit(model, criterion, *batch([2, 1]), steps=80)
    assert "loss_dn_ce" in criterion.weight_dict
    assert all(math.isfinite(value) for value in history)
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert end < start / 4, (start, end)


def test_batch_without_objects_keeps_the_label_book_in_the_graph():
    _, model, criterion = tiny_dino()
    model.train()
    images, mask, targets = batch([0, 0])
    outputs = model(images, mask, targets)
    assert outputs["dn_meta"] is None
    weighted(criterion, criterion(outputs, targets), dn=False).backward()
    assert model.label_enc.weight.grad is not None  # DDP requires every parameter in the graph


def test_dino_training_step_under_bf16_autocast():
    _, model, criterion = tiny_dino()
    model.train()
    images, mask, targets = batch([2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(model(images, mask, targets), targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for k, v in losses.items() if k.startswith("loss"))
    (weighted(criterion, losses, dn=False) + weighted(criterion, losses, dn=True)).backward()
    assert model.label_enc.weight.grad.abs().sum() > 0 and model.transformer.tgt_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config_name", ["dino_4scale.yaml", "dino_5scale.yaml", "dino_demo.yaml"])
def test_shipped_dino_configs_build_and_train_a_step(config_name):
    small = [o for o in TINY_DINO if o.split("=")[0] in (
        "model.backbone", "model.backbone_width", "model.hidden_dim", "model.nheads", "model.enc_layers",
        "model.dec_layers", "model.dim_feedforward", "model.num_queries", "model.enc_n_points", "model.dec_n_points")]
    cfg = load_config(os.path.join(CONFIGS, config_name), small)
    assert cfg.model.query_type == "dino" and cfg.dn.enabled and cfg.dn.contrastive
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, NUM_CLASSES)
    model.train()
    images, mask, targets = batch([2, 0], size=96)
    losses = criterion(model(images, mask, targets), targets)
    assert torch.isfinite(weighted(criterion, losses, dn=False) + weighted(criterion, losses, dn=True))
    levels = model.transformer.level_embed.shape[0]
    assert levels == cfg.model.num_feature_levels == (5 if "5scale" in config_name else 3 if "demo" in config_name
                                                      else 4)


def test_dino_needs_two_stage_and_refinement():
    for missing in ("model.two_stage=false", "model.with_box_refine=false"):
        with pytest.raises(ConfigError, match="query_type 'dino' needs model.two_stage and model.with_box_refine"):
            load_config(None, TINY_DINO + [missing])


def test_five_scale_reads_c2_and_refuses_fewer_levels_than_the_backbone_gives():
    cfg = load_config(os.path.join(CONFIGS, "dino_5scale.yaml"), ["model.backbone=resnet18"])
    model, _, _ = build_model(cfg, NUM_CLASSES)
    assert model.backbone.num_channels == [64, 128, 256, 512]  # C2 (stride 4) .. C5
    assert model.input_proj[4][0].in_channels == 512           # the extra level reads C5
    with pytest.raises(ConfigError, match="num_feature_levels must be 1 .* or >= 4"):
        load_config(os.path.join(CONFIGS, "dino_5scale.yaml"), ["model.num_feature_levels=3"])
