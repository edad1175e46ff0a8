"""What a run reports: non-finite outputs by name, a random backbone kept frozen."""
import os

import pytest
import torch

from detr_cuda.config import load_config
from detr_cuda.engine.diagnostics import non_finite_names, random_backbone_warning
from detr_cuda.engine.logger import Meter


def test_non_finite_outputs_are_named():
    outputs = {"pred_logits": torch.zeros(1, 2), "aux_outputs": [{"pred_boxes": torch.tensor([float("nan")])}]}
    assert non_finite_names(outputs) == ["aux_outputs.0.pred_boxes"]


def test_the_meter_keeps_sums_on_the_device_and_matches_python_float_sums():
    values = [{"a": torch.tensor(0.1), "b": torch.tensor(3.0)}, {"a": torch.tensor(0.7), "b": torch.tensor(-1.0)}]
    meter = Meter()
    for value in values:
        meter.add(value)
    expected_a = (float(torch.tensor(0.1)) + float(torch.tensor(0.7))) / 2
    assert meter.mean() == {"a": expected_a, "b": 1.0}
    with pytest.raises(ValueError, match="expected"):
        meter.add({"c": torch.tensor(1.0)})


@pytest.mark.parametrize("config, overrides, warned", [
    ("deformable_detr.yaml", [], True),                      # the published recipe without ImageNet weights
    ("deformable_detr_refine_dn.yaml", [], True),
    ("deformable_detr.yaml", ["model.backbone_weights=/x/resnet50.pth"], False),
    ("deformable_detr.yaml", ["model.freeze_stem_and_layer1=false"], False),
    ("deformable_detr.yaml", ["model.freeze_stem_and_layer1=false", "model.train_backbone=false"], True),
    ("demo.yaml", [], False),                                 # from scratch, nothing frozen
    ("tiny_coco128.yaml", [], False),
])
def test_training_warns_about_a_random_backbone_kept_partly_frozen(config, overrides, warned):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", config)
    assert (random_backbone_warning(load_config(path, overrides).model) is not None) == warned
