"""``detr_cuda.build``: a config in, the model, its criterion and its post-processor out, for users
who write their own training loop (the tools use :mod:`detr_cuda.engine` instead)."""
import copy
import os
from typing import NamedTuple

import torch

from .config import Config, config_from_dict, load_config


class Built(NamedTuple):
    """What :func:`build` returns; unpacks as ``model, criterion, postprocessor``.

    model: DeformableDETR (or AnchorDeformableDETR with ``model.query_type=anchor``), in training
    mode; ``model(images (B, 3, H, W), padding_mask (B, H, W) bool, targets=None)`` -> dict with
    ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) cxcywh normalised, ``aux_outputs`` ...
    criterion: SetCriterion; ``criterion(outputs, targets)`` -> {loss name: 0-d tensor}; the total
    is ``sum(losses[k] * criterion.weight_dict[k])``. targets: per image ``labels`` (N,) int64 in
    0..K-1 and ``boxes`` (N, 4) cxcywh normalised to the unpadded image.
    postprocessor: PostProcess; ``postprocessor(outputs, sizes (B, 2) (h, w))`` -> per image
    ``scores``, ``labels``, ``boxes`` (absolute xyxy), top ``eval.num_select``.
    """
    model: torch.nn.Module
    criterion: torch.nn.Module
    postprocessor: torch.nn.Module


def resolve_config(config=None, overrides=()):
    """A checked Config from ``config``: a Config (copied, then overridden), a YAML path, a dict in
    the form checkpoints store (``config_to_dict``), or None (the defaults); then ``overrides``
    ("section.field=value" strings). Raises ConfigError naming a bad field."""
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    if isinstance(config, Config):
        config = copy.deepcopy(config)
    elif isinstance(config, dict):
        config = config_from_dict(config)
    else:
        raise TypeError(f"config must be a Config, a YAML path, a dict or None, got {type(config).__name__}")
    return load_config(None, overrides, base=config)


def build(config=None, overrides=(), num_classes=None):
    """(model, criterion, postprocessor) for ``config`` (see :func:`resolve_config`) and
    ``num_classes`` class logits (labels 0..num_classes-1; ``model.num_classes`` when set wins).

    The backbone loads ``model.backbone_weights`` when the config names a file.
    """
    from .models import build_model
    cfg = resolve_config(config, overrides)
    return Built(*build_model(cfg, num_classes))
