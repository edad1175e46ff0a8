"""Every variant's training step reaches every trainable parameter, with and without objects in the
batch: the reason DistributedDataParallel runs with find_unused_parameters=False
(engine/setup.py wrap_model). A parameter left out would make DDP fail at the next step."""
import pytest
import torch

from detr_cuda.models import build_model
from tests.support.configs import VARIANTS, tiny_model_config

ANCHOR = ["model.query_type=anchor"]
CASES = {**VARIANTS,
         "dn": ANCHOR + ["dn.enabled=true"],
         "dn_two_stage": ANCHOR + ["dn.enabled=true", "model.with_box_refine=true", "model.two_stage=true"],
         "dn_contrastive_refine": ANCHOR + ["dn.enabled=true", "dn.contrastive=true", "model.with_box_refine=true"]}


def parameters_without_gradient(overrides, objects_per_image):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_model_config(*overrides), 3)
    model.train()
    images, masks = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.arange(count) % 3, "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]]).repeat(count, 1)}
               for count in objects_per_image]
    losses = criterion(model(images, masks, targets), targets)
    sum(losses[name] * weight for name, weight in criterion.weight_dict.items() if name in losses).backward()
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]


@pytest.mark.parametrize("objects_per_image", [(2, 1), (0, 0)], ids=["objects", "no_objects"])
@pytest.mark.parametrize("variant", sorted(CASES))
def test_every_trainable_parameter_gets_a_gradient(variant, objects_per_image):
    assert parameters_without_gradient(CASES[variant], objects_per_image) == []
