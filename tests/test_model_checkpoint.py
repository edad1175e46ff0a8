"""Saving and loading weights: round trip, official checkpoint dicts, torchvision backbone files."""
import argparse
import fractions

import pytest
import torch

from detr_cuda.models import build_model, load_model_weights, load_state_dict_file, official_coco_category_map
from detr_cuda.models.backbone import ResNet, load_torchvision_resnet_weights
from model_utils import VARIANTS, padded_batch, tiny_config
from test_model_keys import resnet50_keys


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_round_trip_gives_identical_outputs(tmp_path, variant):
    cfg = tiny_config(*VARIANTS[variant])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, 4)
    torch.manual_seed(1)
    fresh, _, _ = build_model(cfg, 4)
    model.eval()
    fresh.eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    images, mask = padded_batch([(64, 96), (80, 64)])
    assert not torch.equal(model(images, mask)["pred_logits"], fresh(images, mask)["pred_logits"])
    report = load_model_weights(fresh, path)
    assert report == {"missing": [], "unexpected": []}
    expected, loaded = model(images, mask), fresh(images, mask)
    assert torch.equal(expected["pred_logits"], loaded["pred_logits"])
    assert torch.equal(expected["pred_boxes"], loaded["pred_boxes"])


def test_official_style_checkpoint_loads(tmp_path):
    """A dict like the released files: 'model' with DDP prefixes, pickled argparse args, profiler keys."""
    cfg = tiny_config(*VARIANTS["box_refine"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, 4)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.total_ops"] = torch.zeros(1)
    # Files that hold only one copy of the duplicated decoder head keys still load.
    for key in [k for k in state if k.startswith("module.transformer.decoder.bbox_embed.")]:
        del state[key]
    checkpoint = {"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 49,
                  "args": argparse.Namespace(lr=2e-4, with_box_refine=True, lr_drop_epochs=None)}
    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    fresh, _, _ = build_model(cfg, 4)
    load_model_weights(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_untrusted_pickle_is_refused_with_an_explanation(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "args": fractions.Fraction(1, 3)}, path)
    with pytest.raises(RuntimeError, match="trust_pickle=True"):
        load_state_dict_file(path)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(), 4)
    other, _, _ = build_model(tiny_config(), 91)
    with pytest.raises(ValueError, match=r"(?s)class_embed\.0\.weight.*model.num_classes=91"):
        load_model_weights(model, {"model": other.state_dict()})
    state = model.state_dict()
    del state["query_embed.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)missing.*query_embed\.weight"):
        load_model_weights(model, state)
    report = load_model_weights(model, state, strict=False)
    assert report == {"missing": ["query_embed.weight"], "unexpected": ["extra.weight"]}


def test_official_coco_category_map_is_identity():
    mapping = official_coco_category_map()
    assert len(mapping) == 90 and all(mapping[i] == i for i in range(1, 91)) and 0 not in mapping


def test_torchvision_resnet50_file_loads_without_renaming(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in resnet50_keys().items()}
    for key in [k for k in state if k.endswith("running_var")]:
        state[key] = state[key].abs() + 0.5
        state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    body = ResNet("resnet50")
    load_torchvision_resnet_weights(body, path)
    loaded = body.state_dict()
    for key in resnet50_keys():
        assert torch.equal(loaded[key], state[key]), key

    broken = dict(state)
    del broken["layer3.2.conv2.weight"]
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"missing 1 keys.*layer3\.2\.conv2\.weight"):
        load_torchvision_resnet_weights(ResNet("resnet50"), path)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"(?s)resnet101.*missing .* keys.*layer3\.10\."):
        load_torchvision_resnet_weights(ResNet("resnet101"), path)
    with pytest.raises(ValueError, match=r"(?s)resnet34.*unexpected.*shape mismatch"):
        load_torchvision_resnet_weights(ResNet("resnet34"), path)


def test_backbone_weights_config_field(tmp_path):
    body = ResNet("resnet18")
    state = body.state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model, _, _ = build_model(tiny_config(f"model.backbone_weights={path}"), 4)
    for key, value in state.items():
        assert torch.equal(model.state_dict()["backbone.0.body." + key], value)
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        build_model(tiny_config(f"model.backbone_weights={tmp_path / 'missing.pth'}"), 4)
