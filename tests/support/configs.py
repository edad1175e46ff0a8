"""The tiny configurations of the test suite, in one place.

All three share one small model (ResNet-18, 1 encoder + 2 decoder layers, FFN 64, no dropout) and
differ only in what their tests need:

- MODEL_TINY: in-process model tests on random images (hidden 64, 4 heads, 12 queries, 2 points);
- RUN_TINY: tools/train.py and tools/eval.py runs in a subprocess on the generated data set
  (1/8-width backbone, hidden 32, 3 levels), small enough for a fraction of a second per step;
- DETECTOR_TINY: the briefly trained detector of the inference and export tests (four levels,
  96-pixel images, the reference operator so that ONNX export and the kernels agree).
"""
from detr_cuda.config import load_config

_SHARED_MODEL = ["model.backbone=resnet18", "model.enc_layers=1", "model.dec_layers=2",
                 "model.dim_feedforward=64", "model.dropout=0.0"]

MODEL_TINY = _SHARED_MODEL + ["model.hidden_dim=64", "model.nheads=4", "model.num_queries=12",
                              "model.enc_n_points=2", "model.dec_n_points=2"]

RUN_TINY = _SHARED_MODEL + [
    "model.backbone_width=8", "model.hidden_dim=32", "model.nheads=2", "model.num_queries=8",
    "model.num_feature_levels=3",
    "data.dataset=synthetic", "data.synthetic_train_images=8", "data.synthetic_val_images=4",
    "data.synthetic_image_size=64", "data.train_short_sides=[64]", "data.train_max_size=64",
    "data.random_crop=false", "data.val_short_side=64", "data.val_max_size=64", "data.num_workers=0",
    "train.device=cpu", "train.batch_size=2", "train.log_interval=1", "train.eval_every=-1",
    "train.dist_timeout_s=60", "eval.batch_size=4",
]

DETECTOR_TINY = _SHARED_MODEL + [
    "model.backbone_width=16", "model.hidden_dim=32", "model.nheads=4", "model.num_queries=10",
    "model.enc_n_points=2", "model.dec_n_points=2", "model.num_feature_levels=4",
    "data.val_short_side=96", "data.val_max_size=128", "eval.num_select=20", "model.msda_backend=reference",
]

# The published Deformable DETR variants on top of MODEL_TINY.
VARIANTS = {
    "single_scale": ["model.num_feature_levels=1"],
    "multi_scale": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
}


# DINO (models/dino.py) on top of any of the tiny configs: its queries, decoder, position encoding
# and contrastive DN (a small DN budget: the tiny models have few queries).
DINO = ["model.query_type=dino", "model.with_box_refine=true", "model.two_stage=true",
        "model.position_temperature=20", "model.position_offset=0", "loss.cls_loss_coef=1",
        "dn.enabled=true", "dn.contrastive=true", "dn.max_dn_queries=24", "dn.label_noise_ratio=0.25"]


def tiny_model_config(*overrides):
    return load_config(None, MODEL_TINY + list(overrides))


def tiny_detector_config(*overrides):
    return load_config(None, DETECTOR_TINY + list(overrides))
