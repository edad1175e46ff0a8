"""What each config field accepts, checked whenever a value is set (file, override or checkpoint):
its type (:func:`check_value`), a fixed set of strings (:data:`CHOICES`) and a numeric range
(:data:`RANGES`; numbers must also be finite). A bad value raises :class:`ConfigError` naming the
field, the value and what is allowed. :mod:`detr_cuda.config` holds the fields themselves.
"""
import math
import types
import typing
from typing import List


class ConfigError(ValueError):
    """A config file or override names an unknown field or has a wrong type."""


# String fields with a fixed set of values, checked whenever a value is set (file, override or checkpoint), so
# a typo fails at config load instead of at first use (e.g. train.amp only at the first training step).
CHOICES = {
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "model.query_type": ("deformable", "anchor", "dino"),
    "model.msda_backend": ("auto", "cpu", "cuda", "reference"),  # or null; any letter case
    "model.ffn_recompute": ("cpu", "always", "never"),
    "data.dataset": ("coco", "synthetic"),
    "data.format": ("coco", "yolo", "voc"),
    "data.invalid_annotations": ("fail", "skip"),
    "data.check_images": ("none", "header", "full"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("none", "bf16", "fp16"),
}
_CASE_INSENSITIVE = ("model.msda_backend",)

# Valid ranges of the numeric fields (a list field: of each item), checked whenever a value is set:
# (low, high, low_inclusive, high_inclusive); None = unbounded on that side.
AT_LEAST_0, AT_LEAST_1 = (0, None, True, False), (1, None, True, False)
UNIT, POSITIVE = (0, 1, True, True), (0, None, False, False)
RANGES = {
    "model.backbone_width": AT_LEAST_1, "model.hidden_dim": (32, None, True, False), "model.nheads": AT_LEAST_1,
    "model.enc_layers": AT_LEAST_1, "model.dec_layers": AT_LEAST_1, "model.dim_feedforward": AT_LEAST_1,
    "model.dropout": (0, 1, True, False), "model.num_queries": AT_LEAST_1, "model.num_feature_levels": AT_LEAST_1,
    "model.enc_n_points": AT_LEAST_1, "model.dec_n_points": AT_LEAST_1, "model.num_classes": AT_LEAST_1,
    "model.backbone_levels": (3, 4, True, True), "model.position_temperature": POSITIVE,
    "model.position_offset": (-1, 0, True, True),
    "dn.dn_groups": AT_LEAST_1, "dn.label_noise_ratio": UNIT, "dn.box_noise_scale": AT_LEAST_0,
    "dn.max_dn_queries": AT_LEAST_0,
    "loss.set_cost_class": AT_LEAST_0, "loss.set_cost_bbox": AT_LEAST_0, "loss.set_cost_giou": AT_LEAST_0,
    "loss.cls_loss_coef": AT_LEAST_0, "loss.bbox_loss_coef": AT_LEAST_0, "loss.giou_loss_coef": AT_LEAST_0,
    "loss.focal_alpha": UNIT, "loss.focal_gamma": AT_LEAST_0,
    "data.synthetic_train_images": AT_LEAST_1, "data.synthetic_val_images": AT_LEAST_1,
    "data.synthetic_image_size": (32, None, True, False), "data.synthetic_seed": AT_LEAST_0,
    "data.train_short_sides": AT_LEAST_1, "data.train_max_size": AT_LEAST_1, "data.crop_resize_sides": AT_LEAST_1,
    "data.crop_min_size": AT_LEAST_1, "data.crop_max_size": AT_LEAST_1, "data.val_short_side": AT_LEAST_1,
    "data.val_max_size": AT_LEAST_1, "data.num_workers": AT_LEAST_0,
    "train.seed": AT_LEAST_0, "train.epochs": AT_LEAST_1, "train.max_steps": AT_LEAST_0,
    "train.batch_size": AT_LEAST_1, "train.accumulate_steps": AT_LEAST_1, "train.lr": (0, 1, False, True),
    "train.lr_backbone": UNIT, "train.lr_linear_proj_mult": AT_LEAST_0, "train.weight_decay": AT_LEAST_0,
    "train.clip_max_norm": AT_LEAST_0, "train.lr_drop": AT_LEAST_0, "train.lr_drop_gamma": (0, 1, False, True),
    "train.warmup_steps": AT_LEAST_0, "train.ema_decay": (0, 1, True, False), "train.checkpoint_every": AT_LEAST_1,
    "train.checkpoint_every_steps": AT_LEAST_0, "train.eval_every": (-1, None, True, False),
    "train.log_interval": AT_LEAST_1, "train.max_bad_steps": AT_LEAST_0, "train.dist_timeout_s": AT_LEAST_1,
    "eval.num_select": AT_LEAST_1, "eval.batch_size": AT_LEAST_1, "eval.score_threshold": UNIT,
}


def range_text(bounds):
    """'>= 1', 'in [0, 1)', 'in (0, 1]' ..."""
    low, high, low_inclusive, high_inclusive = bounds
    if high is None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"


def check_range(value, name):
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value and name in RANGES:
        raise ConfigError(f"{name} must be a non-empty list")
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{name} must be a finite number, got {item!r}")
        bounds = RANGES.get(name)
        if bounds is None or item is None or not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        low, high, low_inclusive, high_inclusive = bounds
        below = low is not None and (item < low or (item == low and not low_inclusive))
        above = high is not None and (item > high or (item == high and not high_inclusive))
        if below or above:
            raise ConfigError(f"{name} must be {range_text(bounds)}, got {item!r}")


def check_choice(value, name):
    allowed = CHOICES.get(name)
    if allowed is None or value is None:
        return
    if (value.lower() if name in _CASE_INSENSITIVE else value) not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def check_value(value, annotation, name):
    """Returns value converted to ``annotation`` or raises ConfigError naming ``name``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, name)
            except ConfigError as error:
                # A list is best explained by the list type's error (which item is wrong).
                is_list_type = typing.get_origin(arg) in (list, List)
                errors.insert(0 if is_list_type == isinstance(value, (list, tuple)) else len(errors), str(error))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [check_value(item, item_type, f"{name}[{i}]") for i, item in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {annotation}")
