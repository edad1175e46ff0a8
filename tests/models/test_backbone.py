"""The ResNet backbone: torchvision ImageNet files load with no renaming; model.backbone_weights; frozen BN
folded into the convolutions equals the plain formula."""
import copy

import pytest
import torch

from detr_cuda.models import build_model
from detr_cuda.models.backbone import (Backbone, Bottleneck, FrozenBatchNorm2d, ResNet, conv_frozen_bn,
                                     load_torchvision_resnet_weights)
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


def randomise_frozen_bn(module, generator):
    """Non-trivial frozen statistics, so that folding them into the convolutions matters."""
    for layer in module.modules():
        if isinstance(layer, FrozenBatchNorm2d):
            channels = layer.weight.shape[0]
            layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=generator))
            layer.running_mean.copy_(torch.randn(channels, generator=generator))
            layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)


def plain_block(block, x):
    """A ResNet block as the two-step formula: every FrozenBatchNorm2d applied after its conv."""
    identity = x if block.downsample is None else block.downsample[1](block.downsample[0](x))
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return block.relu(out + identity)


def plain_resnet(body, x):
    x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
    outputs = []
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in layer:
            x = plain_block(block, x)
        outputs.append(x)
    return outputs  # C2..C5, as ResNet.forward


def test_conv_frozen_bn_is_bn_after_conv():
    generator = torch.Generator().manual_seed(0)
    for bias in (False, True):
        conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
        bn = FrozenBatchNorm2d(5)
        randomise_frozen_bn(bn, generator)
        x = torch.randn(2, 6, 7, 9, generator=generator, requires_grad=True)
        folded = conv_frozen_bn(conv, bn, x)
        folded_grads = torch.autograd.grad(folded.square().sum(), (x, conv.weight))
        plain = bn(conv(x))
        plain_grads = torch.autograd.grad(plain.square().sum(), (x, conv.weight))
        torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(folded_grads, plain_grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def assert_close_at_scale(mine, reference, tolerance):
    """|mine - reference| <= tolerance * max|reference| everywhere (reference in float64)."""
    error = (mine.double() - reference).abs().max().item()
    assert error <= tolerance * reference.abs().max().item(), (error, reference.abs().max().item())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_with_folded_bn_equals_the_plain_formula(name):
    generator = torch.Generator().manual_seed(1)
    body = ResNet(name, width=8)
    with torch.no_grad():
        randomise_frozen_bn(body, generator)
    plain64 = copy.deepcopy(body).double()
    x = torch.randn(2, 3, 64, 96, generator=generator)

    def check(tolerance=1e-5):
        outputs, references = body(x), plain_resnet(plain64, x.double())
        for mine, reference in zip(outputs, references):
            assert_close_at_scale(mine, reference, tolerance)
        # The gradient through the fold, in float64: at layer3 the 64x96 input has 4x6 pixels, so in
        # float32 one ReLU gate that rounding flips moves the gradient by a percent (seen when oneDNN
        # picked another convolution algorithm after other tests had run). In float64 the sums behind
        # this gradient cancel heavily (16 blocks of random statistics): over 30 random weight draws
        # the error reached 1.2e-8 of max|grad| (1 draw in 10 above 1e-8); a wrong fold is O(1).
        folded64 = copy.deepcopy(body).double()
        weight, weight64 = folded64.layer3[0].conv2.weight, plain64.layer3[0].conv2.weight
        grad = torch.autograd.grad(sum(f.sum() for f in folded64(x.double())), weight)[0]
        grad64 = torch.autograd.grad(sum(f.sum() for f in references), weight64)[0]
        assert_close_at_scale(grad, grad64, 1e-6)

    check()
    # Nothing folded is kept: changed weights and statistics show in the next forward.
    with torch.no_grad():
        for model in (body, plain64):
            model.layer1[0].conv1.weight.mul_(2)
            model.layer2[0].bn1.running_var.mul_(3)
    check()


def test_cpu_backbone_runs_channels_last_with_the_same_features(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    backbone = Backbone("resnet18", width=8)
    images = torch.randn(2, 3, 64, 80, generator=generator)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    body_inputs = []
    monkeypatch.setattr(backbone.body, "forward", lambda x, run=backbone.body.forward: body_inputs.append(x) or run(x))
    outputs = backbone(images, mask)
    assert not body_inputs[0].is_contiguous() and body_inputs[0].is_contiguous(memory_format=torch.channels_last)
    for (feature, feature_mask), plain in zip(outputs, backbone.body(images)[-backbone.num_levels:], strict=True):
        assert feature.is_contiguous()  # the rest of the model gets NCHW, as before
        assert_close_at_scale(feature, plain.double(), 1e-5)  # oneDNN's NHWC and NCHW algorithms round apart
        assert feature_mask.shape == (2,) + feature.shape[-2:]
