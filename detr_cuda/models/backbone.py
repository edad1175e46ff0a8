"""ResNet backbones (18/34/50/101) with frozen BatchNorm, and the Joiner that adds position encodings.

Parameter names equal torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...), so a torchvision ImageNet checkpoint file loads
into ``Backbone.body`` with no renaming. Inside the detector the prefix is
``backbone.0.body.``, as in the official Deformable DETR checkpoints.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_file
from .position_encoding import build_position_encoding


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms (all four are buffers).

    eps is 1e-5 as in Deformable DETR. There is no ``num_batches_tracked``; a
    state dict that has one (torchvision's BatchNorm2d) loads with it dropped.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def scale_and_shift(self):
        """(scale, shift) per channel: this layer is x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_and_shift()
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def conv_frozen_bn(conv, bn, x):
    """``bn(conv(x))`` as one convolution, the frozen affine folded into its weight and bias.

    Folded at every call, not cached: a trained convolution gets its gradient through the fold, and
    no load or optimizer step can leave a stale copy. Two passes over the activation (and one in the
    backward) become a bias add inside the convolution; the result differs from the two-step formula
    by float rounding only.
    """
    scale, shift = bn.scale_and_shift()
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, weight, bias)


def conv3x3(in_planes, out_planes, stride=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). The first conv carries the stride."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, first_dilation=1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, first_dilation)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else conv_frozen_bn(*self.downsample, x)
        out = self.relu(conv_frozen_bn(self.conv1, self.bn1, x))
        out = conv_frozen_bn(self.conv2, self.bn2, out)
        # In place: no backward needs a convolution's output.
        return self.relu(out.add_(identity))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101); the 3x3 carries the stride ("ResNet v1.5")."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, first_dilation=1):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = FrozenBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else conv_frozen_bn(*self.downsample, x)
        out = self.relu(conv_frozen_bn(self.conv1, self.bn1, x))
        out = self.relu(conv_frozen_bn(self.conv2, self.bn2, out))
        out = conv_frozen_bn(self.conv3, self.bn3, out)
        # In place: no backward needs a convolution's output.
        return self.relu(out.add_(identity))


RESNET_SPECS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


class ResNet(nn.Module):
    """torchvision-layout ResNet without the classifier (``avgpool``/``fc``).

    forward(x (B, 3, H, W)) -> list of the layer1, layer2, layer3, layer4 outputs
    (C2, C3, C4, C5) at strides 4, 8, 16, 32 (16 for C5 with ``dilation``);
    ``num_channels`` holds their channel counts.
    """

    def __init__(self, name, dilation=False, width=64):
        super().__init__()
        if name not in RESNET_SPECS:
            raise ValueError(f"unknown backbone '{name}' (known: {', '.join(RESNET_SPECS)})")
        block, layers = RESNET_SPECS[name]
        self.name = name
        self.inplanes = width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2, dilate=dilation)
        self.num_channels = [scale * width * block.expansion for scale in (1, 2, 4, 8)]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            # DC5: keep the resolution, grow the receptive field instead.
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       FrozenBatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.dilation, previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation, first_dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(conv_frozen_bn(self.conv1, self.bn1, x)))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def load_torchvision_resnet_weights(body, path):
    """Loads a torchvision ResNet ImageNet state dict file into ``body`` (a ResNet).

    ``fc.*`` and ``num_batches_tracked`` are ignored; any other missing,
    unexpected or mis-shaped key raises ValueError naming the file and keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights: file not found: {path}")
    state = load_file(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = body.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match the {body.name} backbone "
                 f"(is it a torchvision {body.name} state dict?)"]
        if missing:
            lines.append(f"  missing {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys, e.g. {unexpected[:5]}")
        if mismatched:
            lines.append(f"  shape mismatch for {len(mismatched)} keys, e.g. {mismatched[:3]}")
        raise ValueError("\n".join(lines))
    body.load_state_dict(state, strict=True)


class Backbone(nn.Module):
    """ResNet body plus mask resizing.

    forward(images (B, 3, H, W), padding_mask (B, H, W) bool, True = padded)
    -> list over levels of (feature (B, C_l, H_l, W_l), mask (B, H_l, W_l) bool).
    Returns the last ``num_levels`` ResNet stages: 3 = C3, C4, C5 (multi-scale), 4 = C2 .. C5
    (DINO-5scale), 1 = C5 (single-scale). Freezing follows the parameter names, not the levels
    returned: with ``freeze_stem_and_layer1`` layer1 stays frozen also when C2 is returned, as in
    DINO.
    """

    def __init__(self, name, train_backbone=True, freeze_stem_and_layer1=True, dilation=False,
                 num_levels=3, width=64):
        super().__init__()
        self.body = ResNet(name, dilation=dilation, width=width)
        for param_name, parameter in self.body.named_parameters():
            stem_or_layer1 = not param_name.startswith(("layer2", "layer3", "layer4"))
            if not train_backbone or (freeze_stem_and_layer1 and stem_or_layer1):
                parameter.requires_grad_(False)
        if not 1 <= num_levels <= 4:
            raise ValueError(f"a ResNet backbone returns 1 to 4 levels, not {num_levels}")
        self.num_levels = num_levels
        self.num_channels = self.body.num_channels[-num_levels:]

    def forward(self, images, padding_mask):
        channels_last = images.device.type == "cpu"
        if channels_last:
            # oneDNN convolves NHWC directly; NCHW costs it a reorder in and out of every convolution.
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)[-self.num_levels:]
        outputs = []
        for feature in features:
            if channels_last:
                # Back to NCHW for the rest of the model: torch's channels-last GroupNorm kernel (the
                # input projections') loses precision on small maps (10x the NCHW kernel's error).
                feature = feature.contiguous()
            mask = F.interpolate(padding_mask[None].float(), size=feature.shape[-2:])[0].to(torch.bool)
            outputs.append((feature, mask))
        return outputs


class Joiner(nn.Sequential):
    """[backbone, position_encoding]: the official key prefix ``backbone.0.body.``.

    forward(images, padding_mask) -> (features list (B, C_l, H_l, W_l),
    masks list (B, H_l, W_l), position list (B, hidden_dim, H_l, W_l)).
    """

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images, padding_mask):
        features, masks, positions = [], [], []
        for feature, mask in self[0](images, padding_mask):
            features.append(feature)
            masks.append(mask)
            positions.append(self[1](mask).to(feature.dtype))
        return features, masks, positions


def build_backbone(cfg):
    """cfg: the full Config. Returns a Joiner."""
    model_cfg = cfg.model
    backbone = Backbone(model_cfg.backbone, train_backbone=model_cfg.train_backbone,
                        freeze_stem_and_layer1=model_cfg.freeze_stem_and_layer1,
                        dilation=model_cfg.dilation,
                        num_levels=model_cfg.backbone_levels if model_cfg.num_feature_levels > 1 else 1,
                        width=model_cfg.backbone_width)
    if model_cfg.backbone_weights:
        load_torchvision_resnet_weights(backbone.body, model_cfg.backbone_weights)
    return Joiner(backbone, build_position_encoding(cfg))
