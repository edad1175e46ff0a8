"""The ResNet backbone: torchvision ImageNet files load with no renaming; model.backbone_weights."""
import pytest
import torch

from detr_cuda.models import build_model
from detr_cuda.models.backbone import ResNet, load_torchvision_resnet_weights
from tests.models.test_keys import resnet50_keys
from tests.support.configs import tiny_model_config


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
    model, _, _ = build_model(tiny_model_config(f"model.backbone_weights={path}"), 4)
    for key, value in state.items():
        assert torch.equal(model.state_dict()["backbone.0.body." + key], value)
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        build_model(tiny_model_config(f"model.backbone_weights={tmp_path / 'missing.pth'}"), 4)
