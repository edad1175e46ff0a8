"""Typed configuration: dataclass defaults, YAML files and command-line overrides.

A config file is YAML with the sections below (``model``, ``dn``, ``loss``,
``data``, ``train``, ``eval``); ``_base_: other.yaml`` inherits another file
(path relative to this one). ``key.sub=value`` overrides are parsed as YAML
scalars. An unknown field, a value of the wrong type, a string outside a
field's fixed choices (``CHOICES``), a number outside its valid range
(``RANGES``; numbers must also be finite; both in :mod:`detr_cuda.config_checks`) or fields that contradict each other
(:func:`check_config`) raise ``ConfigError`` naming the field, the value and
what is allowed, so a typo never becomes a silent no-op or a late failure.

Relative paths of the input fields (:data:`PATH_FIELDS`: data sets, backbone weights) are made
absolute where they are given: in a config file against that file's folder (so a config works from
any current directory), in an override against the current directory. Paths the run writes
(``train.output_dir``, ``data.synthetic_dir``) stay relative to the current directory.
"""
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import yaml

# ConfigError, CHOICES, RANGES and range_text are also this module's public names.
from .config_checks import (CHOICES, RANGES, ConfigError, check_choice, check_range, check_value,  # noqa: F401
                            range_text)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"            # resnet18 / resnet34 / resnet50 / resnet101
    backbone_weights: Optional[str] = None  # torchvision-format ImageNet .pth, or None (random init)
    backbone_width: int = 64              # stem channels (stages 1x, 2x, 4x, 8x); 64 = torchvision ResNet, less for CPU demos
    train_backbone: bool = True           # False freezes the whole backbone
    freeze_stem_and_layer1: bool = True
    dilation: bool = False                # DC5: stride 16 instead of 32 in the last stage
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    ffn_recompute: str = "cpu"            # with dropout 0 (DN, DINO recipes), the encoder FFN keeps no (tokens x dim_feedforward) hidden for the backward, recomputed block by block (detr_cuda/models/feed_forward.py): "cpu" (there it costs no time), "always" (a GPU trades ~1/6 more FFN products for the memory), "never"; no effect with dropout
    num_queries: int = 300
    num_feature_levels: int = 4           # 1 = single-scale variant
    backbone_levels: int = 3              # ResNet stages a multi-scale model reads: 3 = C3-C5 (strides 8-32), 4 = C2-C5 (from stride 4, DINO-5scale)
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    query_type: str = "deformable"        # "deformable" (query_embed), "anchor" (DAB-style 4-d anchors, used by DN) or "dino" (DINO; needs two_stage and with_box_refine)
    position_temperature: float = 10000.0  # sine position encoding: temperature (DINO: 20)
    position_offset: float = -0.5         # sine position encoding: added to the 1-based pixel counts (Deformable DETR -0.5; DETR, DINO 0)
    num_classes: Optional[int] = None     # None: taken from the dataset
    msda_backend: Optional[str] = None    # None (auto), "reference", "cpu" or "cuda"


@dataclass
class DNConfig:
    """Denoising training (DN-DETR; detr_cuda/models/dn_queries.py; losses in criterion.py). Needs model.query_type "anchor" or "dino"."""
    enabled: bool = False
    dn_groups: int = 5                    # noised copies of the batch's GT (used when max_dn_queries is 0)
    label_noise_ratio: float = 0.2        # probability of replacing a DN label by a uniform random class
    box_noise_scale: float = 0.4          # centre shift <= scale * size / 2, size x (1 +- scale); 2x for negatives
    contrastive: bool = False             # DINO contrastive denoising (positive + negative queries)
    max_dn_queries: int = 0               # > 0: total DN query budget, groups = max(1, budget // group size); 0 = dn_groups


@dataclass
class LossConfig:
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class DataConfig:
    dataset: str = "coco"                 # "coco" (image folders + annotations in data.format) or "synthetic"
    format: str = "coco"                  # annotations: "coco" (instances JSON), "yolo" (labels/*.txt), "voc" (XML)
    # One data set (a path) or several (lists of equal length, concatenated; categories merged by name).
    # Unset ones are filled from data.root in data.format's standard layout (data/build.py).
    root: Optional[str] = None
    train_images: Optional[Union[str, List[str]]] = None
    train_annotations: Optional[Union[str, List[str]]] = None
    val_images: Optional[Union[str, List[str]]] = None
    val_annotations: Optional[Union[str, List[str]]] = None
    synthetic_dir: str = "data_generated/synthetic"
    synthetic_train_images: int = 256
    synthetic_val_images: int = 64
    synthetic_image_size: int = 256
    synthetic_seed: int = 0               # generated set's seed (val uses seed + 1); independent of train.seed
    train_short_sides: List[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    train_max_size: int = 1333
    crop_resize_sides: List[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600
    random_crop: bool = True
    horizontal_flip: bool = True
    val_short_side: int = 800
    val_max_size: int = 1333
    invalid_annotations: str = "fail"     # "fail" or "skip" (with a count)
    check_images: str = "header"          # start-up image check: "none", "header" (cheap, finds truncation), "full" (decode all)
    num_workers: int = 2
    cache_images: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    device: str = "auto"                  # "auto", "cpu", "cuda"
    seed: int = 42
    epochs: int = 50
    max_steps: int = 0                    # > 0 stops after this many optimizer steps
    batch_size: int = 2                   # per process
    accumulate_steps: int = 1
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    lr_backbone_names: List[str] = field(default_factory=lambda: ["backbone.0"])
    lr_linear_proj_names: List[str] = field(default_factory=lambda: ["reference_points", "sampling_offsets"])
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int = 40
    lr_drop_gamma: float = 0.1
    warmup_steps: int = 0
    amp: str = "none"                     # "none", "bf16", "fp16"
    ema: bool = False
    ema_decay: float = 0.9997
    checkpoint_every: int = 1             # epochs between checkpoint_last.pth writes
    # Optimizer steps between mid-epoch checkpoint_last.pth writes (0 = off), so a killed run
    # (SIGKILL, OOM, node loss) loses at most this many steps. A COCO epoch is ~7300 steps at 16
    # images per step (~3700 at 32): 1000 steps lose minutes of GPU time, not up to an epoch. The cost is
    # one ~0.5 GB write per 1000 steps (R50 weights + AdamW's two moments: 40M params x 12 B; its time
    # not measured here). Short runs (the demo: 512 steps) checkpoint once per epoch only.
    checkpoint_every_steps: int = 1000
    keep_epoch_checkpoints: bool = False
    eval_every: int = 1                   # epochs between evaluations, 0 = only at the end, -1 = never
    log_interval: int = 20                # iterations between log lines
    max_bad_steps: int = 0                # non-finite losses tolerated before stopping
    deterministic: bool = False
    dist_timeout_s: int = 1800            # collective timeout: a dead or hung peer stops the others after this


@dataclass
class EvalConfig:
    num_select: int = 100                 # top-k detections per image
    batch_size: int = 2                   # per process; 1 makes scores independent of batch padding
    score_threshold: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dn: DNConfig = field(default_factory=DNConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Input paths: relative ones are resolved where they are given (module docstring). A list field: each item.
PATH_FIELDS = ("data.root", "data.train_images", "data.train_annotations", "data.val_images", "data.val_annotations",
               "model.backbone_weights")
DATA_PATH_PAIRS = (("data.train_images", "data.train_annotations"), ("data.val_images", "data.val_annotations"))

def check_config(config):
    """Raises ConfigError when fields contradict each other (each field alone was checked when set)."""
    model, data = config.model, config.data
    if model.hidden_dim % 32 != 0:
        raise ConfigError(f"model.hidden_dim must be a multiple of 32 (GroupNorm(32) in the input projections), "
                          f"got {model.hidden_dim}")
    if model.hidden_dim % model.nheads != 0:
        raise ConfigError(f"model.hidden_dim ({model.hidden_dim}) must be divisible by model.nheads ({model.nheads})")
    if 1 < model.num_feature_levels < model.backbone_levels:
        raise ConfigError(f"model.num_feature_levels must be 1 (single-scale) or >= {model.backbone_levels} (the "
                          f"model.backbone_levels ResNet levels plus extra ones), got {model.num_feature_levels}")
    if config.dn.enabled and model.query_type not in ("anchor", "dino"):
        raise ConfigError("dn.enabled needs model.query_type 'anchor' or 'dino' (DN queries are anchor boxes)")
    if model.query_type == "dino" and not (model.two_stage and model.with_box_refine):
        raise ConfigError("model.query_type 'dino' needs model.two_stage and model.with_box_refine true (DINO's "
                          "anchors are the encoder's top-k proposals, refined layer by layer)")
    if data.crop_min_size > data.crop_max_size:
        raise ConfigError(f"data.crop_min_size ({data.crop_min_size}) must not exceed data.crop_max_size "
                          f"({data.crop_max_size})")
    _check_data_lists(config)
    return config


def _check_data_lists(config):
    """Several data sets: an image-folder list and an annotation list of the same non-zero length."""
    for images_name, annotations_name in DATA_PATH_PAIRS:
        images, annotations = (_field(config, name) for name in (images_name, annotations_name))
        for name, value in ((images_name, images), (annotations_name, annotations)):
            if isinstance(value, list) and not value:
                raise ConfigError(f"{name}: an empty list (give one path, or one per data set)")
        if not isinstance(images, list) and not isinstance(annotations, list):
            continue
        counts = [len(v) if isinstance(v, list) else (0 if v is None else 1) for v in (images, annotations)]
        if counts[0] != counts[1]:
            raise ConfigError(f"{images_name} has {counts[0]} path(s) but {annotations_name} has {counts[1]}: "
                              "give one annotation source per image folder, in the same order")


def _field(config, name):
    section, key = name.split(".")
    return getattr(getattr(config, section), key)


def resolve_path(path, folder):
    """``path`` (``~`` expanded) made absolute against ``folder`` when relative; None and "" unchanged."""
    if not isinstance(path, str) or not path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(folder, path))


def _resolve_paths(name, value, folder):
    """The value of field ``name`` with its relative input paths resolved against ``folder``."""
    if name not in PATH_FIELDS:
        return value
    if isinstance(value, list):
        return [resolve_path(item, folder) for item in value]
    return resolve_path(value, folder)


def _resolve_layer_paths(values, folder):
    """A config file's nested dict with its input paths resolved against ``folder`` (a copy)."""
    resolved = dict(values)
    for name in PATH_FIELDS:
        section, key = name.split(".")
        if isinstance(resolved.get(section), dict) and key in resolved[section]:
            resolved[section] = dict(resolved[section])
            resolved[section][key] = _resolve_paths(name, resolved[section][key], folder)
    return resolved


def _merge_dict(config, values, prefix=""):
    """Writes a nested dict of values into dataclass ``config`` in place."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}
    for key, value in values.items():
        name = prefix + str(key)
        if key not in known:
            raise ConfigError(f"unknown config field '{name}' (known in this section: "
                              f"{', '.join(sorted(known))})")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            _merge_dict(current, value, name + ".")
        else:
            checked = check_value(value, hints[key], name)
            check_choice(checked, name)
            check_range(checked, name)
            setattr(config, key, checked)


def _load_yaml_tree(path, seen=()):
    """[(path, values)] of a file and its _base_ chain, base first. Paths are absolute but not
    symlink-resolved: a file's relative paths are meant from the folder it was named in."""
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config inheritance loop through {path}")
    with open(path) as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = values.pop("_base_", None)
    layers = []
    if base is not None:
        layers = _load_yaml_tree(path.parent / base, seen + (path.resolve(),))
    return layers + [(path, values)]


def parse_override(text):
    """'train.lr=1e-4' -> ('train.lr', 0.0001). Values are YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    # YAML reads 1e-4 as a string (no dot); accept it as the number it means.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") or value.lower().lstrip("+-") in ("nan", "inf") \
                else value
        except ValueError:
            pass
    return key.strip(), value


def apply_override(config, key, value):
    """Sets ``key`` ("section.field") to ``value``; a relative input path is taken from the current directory."""
    value = _resolve_paths(key.strip(), value, os.getcwd())
    parts = key.split(".")
    nested = value
    for part in reversed(parts):
        nested = {part: nested}
    _merge_dict(config, nested)


def load_config(path=None, overrides=(), base=None):
    """Config from ``base`` (default: the defaults; modified in place), an optional YAML file (with
    _base_ chain; its relative input paths resolved against its folder) and overrides (relative input
    paths against the current directory)."""
    config = Config() if base is None else base
    if path is not None:
        for layer_path, values in _load_yaml_tree(path):
            try:
                _merge_dict(config, _resolve_layer_paths(values, layer_path.parent))
            except ConfigError as error:
                raise ConfigError(f"{layer_path}: {error}") from None
    for text in overrides:
        key, value = parse_override(text)
        apply_override(config, key, value)
    return check_config(config)


def config_to_dict(config):
    return dataclasses.asdict(config)


def config_from_dict(values):
    """Inverse of config_to_dict (checkpoints store the resolved config as a dict)."""
    config = Config()
    _merge_dict(config, values)
    return check_config(config)


def dump_config(config):
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
