"""DN-Deformable-DETR: anchor queries, DN wiring, isolation of the DN queries, DN losses, training."""
import copy
import math
import os

import pytest
import torch

from detr_cuda.config import load_config
from detr_cuda.models import build_model
from detr_cuda.models.anchor_decoder import box_sine_embedding
from detr_cuda.models.dn_queries import prepare_dn_queries
from tests.support.models import fit, seeded_model
from tests.support.official_layouts import official_dn_deformable_keys

# Small enough for a CPU test: frozen ResNet-18, C5 only, 32 channels, 2 decoder layers.
TINY_ANCHOR = ["model.backbone=resnet18", "model.train_backbone=false", "model.num_feature_levels=1",
               "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2",
               "model.dim_feedforward=64", "model.num_queries=10", "model.dropout=0.0",
               "model.enc_n_points=2", "model.dec_n_points=2", "model.query_type=anchor",
               "model.with_box_refine=true"]
NUM_CLASSES = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_anchor_model(*overrides, seed=0):
    return seeded_model(TINY_ANCHOR + list(overrides), NUM_CLASSES, seed)


def batch(gt_counts, size=64, seed=0):
    """Random images (the last one padded on the right) and random in-image boxes."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(gt_counts), 3, size, size, generator=generator)
    mask = torch.zeros(len(gt_counts), size, size, dtype=torch.bool)
    mask[-1, :, size * 3 // 4:] = True
    images[-1, :, :, size * 3 // 4:] = 0
    targets = []
    for n in gt_counts:
        wh = 0.1 + 0.4 * torch.rand(n, 2, generator=generator)
        centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
                        "boxes": torch.cat([centre, wh], 1)})
    return images, mask, targets


def weighted(criterion, losses, dn):
    return sum(losses[k] * w for k, w in criterion.weight_dict.items()
               if k in losses and k.startswith("loss_dn") == dn)


def test_box_sine_embedding_follows_the_dab_formula():
    boxes = torch.tensor([[[0.1, 0.7, 0.25, 0.5], [0.9, 0.2, 0.05, 0.3]]])
    num_feats = 8
    embedded = box_sine_embedding(boxes, num_feats)
    assert embedded.shape == (1, 2, 4 * num_feats)
    for q in range(2):
        for block, coord in enumerate([1, 0, 2, 3]):  # y, x, w, h
            for i in range(num_feats):
                angle = boxes[0, q, coord].item() * 2 * math.pi / 10000 ** (2 * (i // 2) / num_feats)
                expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
                assert embedded[0, q, block * num_feats + i].item() == pytest.approx(expected, abs=1e-5)


def test_parameter_names_match_the_official_dn_deformable_detr_release():
    cfg = load_config(None, ["model.query_type=anchor", "model.with_box_refine=true", "model.dim_feedforward=2048",
                             "model.dropout=0.0", "dn.enabled=true"])
    model, _, _ = build_model(cfg, 91)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    expected = official_dn_deformable_keys()
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}
    # A state dict with exactly these keys loads strictly (the official checkpoint's model part).
    model.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)


@pytest.mark.parametrize("two_stage", [False, True])
def test_eval_outputs_identical_with_dn_on_or_off(two_stage):
    stage = [f"model.two_stage={str(two_stage).lower()}"]
    _, plain, _ = tiny_anchor_model(*stage, "dn.enabled=false", seed=0)
    _, with_dn, _ = tiny_anchor_model(*stage, "dn.enabled=true", "dn.contrastive=true", seed=1)
    with_dn.load_state_dict(plain.state_dict(), strict=True)
    images, mask, targets = batch([2, 3], size=128 if two_stage else 64)  # two-stage: >= 10 encoder tokens
    plain.eval()
    with_dn.eval()
    with torch.no_grad():
        expected = plain(images, mask)
        got = with_dn(images, mask, targets)
    assert "dn_outputs" not in got and "dn_meta" not in got
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])
    for ours, theirs in zip(got["aux_outputs"], expected["aux_outputs"]):
        assert torch.equal(ours["pred_boxes"], theirs["pred_boxes"])


@pytest.mark.parametrize("two_stage, refine", [(False, True), (False, False), (True, True)])
def test_matching_outputs_unchanged_by_dn_queries_in_training(two_stage, refine):
    _, model, _ = tiny_anchor_model(f"model.two_stage={str(two_stage).lower()}",
                                    f"model.with_box_refine={str(refine).lower()}", "dn.enabled=true")
    model.train()  # dropout is 0: training and DN-free forward passes are comparable
    images, mask, targets = batch([3, 0, 1], size=128 if two_stage else 64)
    with_dn = model(images, mask, targets)
    assert with_dn["dn_outputs"]["pred_logits"].shape == (3, 5 * 3, NUM_CLASSES)
    without_dn = model(images, mask)
    assert "dn_outputs" not in without_dn
    torch.testing.assert_close(with_dn["pred_logits"], without_dn["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without_dn["pred_boxes"], atol=1e-5, rtol=1e-5)


def decode_with_dn(model, images, mask, dn, attn_mask):
    """Runs the real encoder + anchor decoder with the DN block; returns hs (D, B, P+Q, C) and anchors."""
    prefix = {"tgt": dn["content"], "reference_points": dn["boxes"]}
    hs, _, inter_references, _, _ = model.run_transformer(images, mask, prefix, attn_mask)
    return hs, inter_references


@pytest.mark.parametrize("contrastive", [False, True])
def test_dn_groups_and_matching_queries_are_isolated_in_the_decoder(contrastive):
    cfg, model, _ = tiny_anchor_model("dn.enabled=true", f"dn.contrastive={str(contrastive).lower()}",
                                      "dn.dn_groups=3")
    model.eval()
    images, mask, targets = batch([2, 0, 1])
    with torch.no_grad():
        dn = prepare_dn_queries(targets, model.label_enc, NUM_CLASSES, model.num_queries, cfg.dn)
        group_size, num_dn = dn["dn_meta"]["group_size"], dn["dn_meta"]["num_dn_queries"]
        hs, refs = decode_with_dn(model, images, mask, dn, dn["attn_mask"])
        perturbed = copy.deepcopy(dn)
        group = slice(group_size, 2 * group_size)  # every slot of group 1, padding included
        perturbed["content"][:, group] += torch.randn_like(perturbed["content"][:, group])
        perturbed["boxes"][:, group] = torch.rand_like(perturbed["boxes"][:, group]) * 0.5 + 0.25
        hs_p, refs_p = decode_with_dn(model, images, mask, perturbed, dn["attn_mask"])
        untouched = torch.ones(num_dn + model.num_queries, dtype=torch.bool)
        untouched[group] = False
        torch.testing.assert_close(hs_p[:, :, untouched], hs[:, :, untouched], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(refs_p[:, :, untouched], refs[:, :, untouched], atol=1e-5, rtol=1e-5)
        # The perturbation did reach the perturbed group's real queries (image 0 has 2 objects).
        assert (hs_p[:, 0, group_size:group_size + 2] - hs[:, 0, group_size:group_size + 2]).abs().max() > 1e-2
        # Without the mask the same perturbation leaks into the matching queries: the check is sensitive.
        hs_open, _ = decode_with_dn(model, images, mask, dn, None)
        hs_open_p, _ = decode_with_dn(model, images, mask, perturbed, None)
        assert (hs_open_p[:, :, num_dn:] - hs_open[:, :, num_dn:]).abs().max() > 1e-3


def test_padded_dn_slots_influence_nothing():
    cfg, model, _ = tiny_anchor_model("dn.enabled=true", "dn.dn_groups=2")
    model.eval()
    images, mask, targets = batch([3, 1])
    with torch.no_grad():
        dn = prepare_dn_queries(targets, model.label_enc, NUM_CLASSES, model.num_queries, cfg.dn)
        hs, _ = decode_with_dn(model, images, mask, dn, dn["attn_mask"])
        perturbed = copy.deepcopy(dn)
        padded = [1, 2, 4, 5]  # image 1 has one object: slots 1, 2 of each 3-slot group are padding
        perturbed["content"][1, padded] = torch.randn(len(padded), perturbed["content"].shape[-1])
        hs_p, _ = decode_with_dn(model, images, mask, perturbed, dn["attn_mask"])
    real = [i for i in range(hs.shape[2]) if i not in padded]
    torch.testing.assert_close(hs_p[:, 1, real], hs[:, 1, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs_p[:, 0], hs[:, 0])


def test_dn_losses_finite_keys_weighted_and_reach_label_embedding():
    _, model, criterion = tiny_anchor_model("dn.enabled=true", "dn.box_noise_scale=1.0", "dn.label_noise_ratio=0.5")
    model.train()
    images, mask, targets = batch([2, 0, 4])
    losses = criterion(model(images, mask, targets), targets)
    dn_keys = {k for k in losses if k.startswith("loss_dn")}
    assert dn_keys == {f"loss_dn_{name}{suffix}" for name in ("ce", "bbox", "giou") for suffix in ("", "_0")}
    assert dn_keys <= set(criterion.weight_dict)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in dn_keys)
    weighted(criterion, losses, dn=True).backward()
    grad = model.label_enc.weight.grad
    used = torch.cat([t["labels"] for t in targets]).unique()
    assert grad is not None and grad[used].abs().sum() > 0


def test_batch_without_objects_gives_zero_dn_losses_and_keeps_label_embedding_in_graph():
    _, model, criterion = tiny_anchor_model("dn.enabled=true")
    model.train()
    images, mask, targets = batch([0, 0])
    outputs = model(images, mask, targets)
    assert outputs["dn_meta"] is None and "dn_outputs" not in outputs
    losses = criterion(outputs, targets)
    assert all(losses[f"loss_dn_{n}{s}"] == 0 for n in ("ce", "bbox", "giou") for s in ("", "_0"))
    weighted(criterion, losses, dn=False).backward()
    assert model.label_enc.weight.grad is not None  # DDP requires every parameter in the graph


def test_dn_needs_anchor_queries():
    with pytest.raises(ValueError, match="query_type 'anchor'"):
        load_config(None, ["dn.enabled=true"])


@pytest.mark.parametrize("override, message", [
    ("dn.dn_groups=0", "dn.dn_groups must be >= 1"),
    ("dn.label_noise_ratio=1.5", "dn.label_noise_ratio must be in"),
    ("dn.box_noise_scale=-0.1", "dn.box_noise_scale must be >= 0"),
    ("dn.max_dn_queries=-1", "dn.max_dn_queries must be >= 0"),
])
def test_bad_dn_settings_name_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(None, TINY_ANCHOR + ["dn.enabled=true", override])


def set_zero_noise(cfg):
    cfg.dn.label_noise_ratio = 0.0
    cfg.dn.box_noise_scale = 0.0


def test_zero_noise_dn_losses_far_below_matching_losses_after_training():
    """Denoising with the answer as input is easy to learn, matching random boxes is not:
    after training on fresh random batches, DN with zero noise reconstructs held-out GT."""
    cfg, model, criterion = tiny_anchor_model("dn.enabled=true")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(60):
        images, mask, targets = batch([2, 3], seed=100 + step)
        losses = criterion(model(images, mask, targets), targets)
        optimizer.zero_grad()
        (weighted(criterion, losses, dn=False) + weighted(criterion, losses, dn=True)).backward()
        optimizer.step()
    set_zero_noise(cfg)
    images, mask, targets = batch([2, 3, 1], seed=7)
    with torch.no_grad():
        losses = criterion(model(images, mask, targets), targets)
    dn_total, matching_total = weighted(criterion, losses, dn=True), weighted(criterion, losses, dn=False)
    assert dn_total < 0.4 * matching_total, (dn_total, matching_total)


@pytest.mark.parametrize("contrastive", [False, True])
def test_tiny_dn_model_overfits_a_few_images(contrastive):
    cfg, model, criterion = tiny_anchor_model("dn.enabled=true", f"dn.contrastive={str(contrastive).lower()}")
    history = fit(model, criterion, *batch([2, 1]), steps=120)
    assert all(math.isfinite(value) for value in history)
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert end < start / 5, (start, end)


def test_dn_training_step_under_bf16_autocast():
    _, model, criterion = tiny_anchor_model("dn.enabled=true", "dn.contrastive=true")
    model.train()
    images, mask, targets = batch([2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(model(images, mask, targets), targets)
    dn_losses = {k: v for k, v in losses.items() if k.startswith("loss_dn")}
    assert dn_losses and all(v.dtype == torch.float32 and torch.isfinite(v) for v in dn_losses.values())
    weighted(criterion, losses, dn=True).backward()
    assert model.label_enc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config_name", ["deformable_detr_dn.yaml", "deformable_detr_refine_dn.yaml",
                                         "deformable_detr_two_stage_dn.yaml"])
def test_shipped_dn_configs_build_and_train_a_step(config_name):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", config_name)
    cfg = load_config(path, [o for o in TINY_ANCHOR if not o.startswith("model.with_box_refine")])
    assert cfg.dn.enabled and cfg.model.query_type == "anchor"
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, NUM_CLASSES)
    model.train()
    images, mask, targets = batch([2, 0], size=128)
    losses = criterion(model(images, mask, targets), targets)
    assert "loss_dn_ce" in losses and torch.isfinite(weighted(criterion, losses, dn=True))


def test_without_aux_loss_dn_supervises_only_the_last_layer():
    _, model, criterion = tiny_anchor_model("dn.enabled=true", "model.aux_loss=false")
    model.train()
    images, mask, targets = batch([1, 2])
    outputs = model(images, mask, targets)
    assert "aux_outputs" not in outputs["dn_outputs"]
    losses = criterion(outputs, targets)
    dn_keys = {k for k in losses if k.startswith("loss_dn")}
    assert dn_keys == {"loss_dn_ce", "loss_dn_bbox", "loss_dn_giou"}
    assert {k for k in criterion.weight_dict if k.startswith("loss_dn")} == dn_keys
