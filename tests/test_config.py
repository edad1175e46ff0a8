import os
import re

import pytest

from detr_cuda.config import ConfigError, config_from_dict, config_to_dict, load_config


def test_defaults_are_the_published_ones():
    config = load_config()
    assert (config.model.hidden_dim, config.model.nheads, config.model.num_queries) == (256, 8, 300)
    assert (config.train.lr, config.train.lr_backbone, config.train.clip_max_norm) == (2e-4, 2e-5, 0.1)


def test_overrides_are_typed():
    config = load_config(None, ["train.lr=1e-4", "model.two_stage=true", "data.train_short_sides=[320, 352]"])
    assert config.train.lr == 1e-4
    assert config.model.two_stage is True
    assert config.data.train_short_sides == [320, 352]


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config field 'train.lrr'"),
    ("modle.two_stage=true", "unknown config field 'modle'"),
    ("model.two_stage=3", "model.two_stage: expected true/false"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("data.train_short_sides=5", "data.train_short_sides: expected a list"),
    ("train.lr", "must look like section.field=value"),
    ("model.backbone=resnet99", "model.backbone: 'resnet99' is not one of resnet18, resnet34, resnet50, resnet101"),
    ("train.device=tpu", "train.device: 'tpu' is not one of auto, cpu, cuda"),
    ("train.amp=fp8", "train.amp: 'fp8' is not one of none, bf16, fp16"),
    ("data.dataset=voc", "data.dataset: 'voc' is not one of coco, synthetic"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_base_inheritance_and_unknown_key(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  hidden_dim: 128\ntrain:\n  epochs: 3\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 5\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.model.hidden_dim, config.train.epochs) == (128, 5)
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config field 'train\.epoch'"):
        load_config(tmp_path / "bad.yaml")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_dict_round_trip():
    config = load_config(None, ["model.query_type=anchor", "dn.enabled=true", "model.num_classes=7"])
    assert config_from_dict(config_to_dict(config)) == config


def test_choices_are_the_ones_the_modules_accept():
    from detr_cuda.config import CHOICES
    from detr_cuda.models.backbone import RESNET_SPECS
    from detr_cuda.ops.functional import BACKENDS
    assert set(CHOICES["model.backbone"]) == set(RESNET_SPECS)
    assert set(CHOICES["model.msda_backend"]) == set(BACKENDS) | {"auto"}
    load_config(None, ["model.msda_backend=CPU", "model.msda_backend=null"])  # any case, or none


def test_a_bad_choice_in_a_yaml_file_or_a_checkpoint_config_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  amp: fp8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.amp: 'fp8' is not one of"):
        load_config(tmp_path / "bad.yaml")
    values = config_to_dict(load_config())
    values["model"]["backbone"] = "resnet99"
    with pytest.raises(ConfigError, match="model.backbone: 'resnet99'"):
        config_from_dict(values)


@pytest.mark.parametrize("variant", ["deformable_detr_dn", "deformable_detr_refine_dn", "deformable_detr_two_stage_dn"])
def test_dn_configs_carry_dn_detr_published_recipe(variant):
    """anchors-code.md §5.6 / §9: DN-Deformable-DETR trains with FFN 2048, dropout 0, class
    weight 1, AdamW 1e-4 / backbone 1e-5 and no separate rate for offsets, 5 groups, noise 0.2 / 0.4."""
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", variant + ".yaml")
    cfg = load_config(path, [])
    assert (cfg.model.dim_feedforward, cfg.model.dropout, cfg.loss.cls_loss_coef) == (2048, 0.0, 1.0)
    assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.lr_linear_proj_mult) == (1e-4, 1e-5, 1.0)
    assert (cfg.dn.dn_groups, cfg.dn.label_noise_ratio, cfg.dn.box_noise_scale) == (5, 0.2, 0.4)
    assert cfg.model.query_type == "anchor" and cfg.dn.enabled


def test_a_config_files_input_paths_are_relative_to_that_file(tmp_path, monkeypatch):
    (tmp_path / "configs" / "base").mkdir(parents=True)
    (tmp_path / "configs" / "base" / "base.yaml").write_text(
        "model:\n  backbone_weights: weights/r50.pth\ndata:\n  root: ../../data/coco\n")
    (tmp_path / "configs" / "child.yaml").write_text(
        "_base_: base/base.yaml\ndata:\n  train_images: [../a/images, /abs/b/images]\n  train_annotations: "
        "[../a/ann.json, ~/b.json]\n  synthetic_dir: generated\ntrain:\n  output_dir: outputs/x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config("../configs/child.yaml", ["data.val_images=val/images", "data.val_annotations=/v.json"])
    assert config.model.backbone_weights == str(tmp_path / "configs" / "base" / "weights" / "r50.pth")
    assert config.data.root == str(tmp_path / "data" / "coco")                  # against base.yaml's folder
    assert config.data.train_images == [str(tmp_path / "a" / "images"), "/abs/b/images"]
    assert config.data.train_annotations == [str(tmp_path / "a" / "ann.json"), os.path.expanduser("~/b.json")]
    assert config.data.val_images == str(elsewhere / "val" / "images")        # an override: the current folder
    assert config.data.val_annotations == "/v.json"
    # what the run writes stays relative to where it runs
    assert (config.train.output_dir, config.data.synthetic_dir) == ("outputs/x", "generated")
    # a stored (resolved) config reads back unchanged
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("overrides, message", [
    (["data.train_images=[a, b]", "data.train_annotations=a.json"],
     "data.train_images has 2 path(s) but data.train_annotations has 1"),
    (["data.val_images=[]"], "data.val_images: an empty list"),
    (["data.format=kitti"], "data.format: 'kitti' is not one of coco, yolo, voc"),
    (["data.train_images=[a, 3]"], "data.train_images[1]: expected a string"),
])
def test_bad_data_lists_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
