"""The original kernel swapped into every MSDeformAttn layer (benchmarks/original_kernel.py, used by
bench_model.py --baseline), checked on the CPU with a stand-in for the original extension
(tests/support/fake_original_msda.py: the original's call signature over our reference op)."""
import importlib.util
import os
import sys

import pytest
import torch

from detr_cuda.models import build_model
from detr_cuda.ops import functional
from detr_cuda.ops import module as layer_module
from tests.support.configs import tiny_model_config
from tests.support.models import padded_batch, random_targets, total_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = os.path.join(ROOT, "tests", "support", "fake_original_msda.py")


@pytest.fixture(scope="module")
def original_kernel():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("original_kernel",
                                                  os.path.join(ROOT, "benchmarks", "original_kernel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(model, criterion, images, mask, targets):
    model.zero_grad()
    outputs = model(images, mask)
    total_loss(criterion, criterion(outputs, targets)).backward()
    return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_layer_runs_the_original_kernel_with_the_same_results(original_kernel):
    fake = original_kernel.load_original(FAKE)
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_model_config("model.with_box_refine=true", "model.msda_backend=reference"), 4)
    images, mask = padded_batch([(64, 96), (48, 80)])
    targets = random_targets([2, 1], 4)
    expected_outputs, expected_grads = run(model, criterion, images, mask, targets)
    with original_kernel.original_kernel_in_layers(fake) as counter:
        outputs, grads = run(model, criterion, images, mask, targets)
        original_kernel.check_calls(counter)
    assert counter["calls"] == 1 + 2  # one per encoder and decoder layer of the tiny config
    assert fake.calls == {"forward": 3, "backward": 3}
    assert layer_module.ms_deform_attn is functional.ms_deform_attn  # restored
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outputs[key], expected_outputs[key], rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_half_precision_reaches_the_original_kernel_as_float32(original_kernel):
    """The original has float32/float64 kernels only: under bf16 autocast the swap hands it float32
    (the stand-in refuses anything else) and gives back value's dtype."""
    op = original_kernel.original_op(original_kernel.load_original(FAKE))
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    value = torch.randn(2, 30, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    locations = torch.rand(2, 5, 2, 2, 3, 2, requires_grad=True)
    attention = torch.softmax(torch.randn(2, 5, 2, 6), -1).view(2, 5, 2, 2, 3).requires_grad_()
    output = op(value, shapes, starts, locations, attention)
    assert output.dtype == torch.bfloat16 and output.shape == (2, 5, 16)
    output.float().sum().backward()
    assert value.grad.dtype == torch.bfloat16 and locations.grad.dtype == torch.float32
    expected = functional.ms_deform_attn(value.detach().float(), shapes, starts, locations.detach(),
                                         attention.detach(), backend="reference")
    torch.testing.assert_close(output.float(), expected, rtol=1e-2, atol=1e-2)


def test_a_run_that_never_reached_the_original_kernel_is_an_error(original_kernel):
    fake = original_kernel.load_original(FAKE)
    with original_kernel.original_kernel_in_layers(fake) as counter:
        pass  # the layer's op was replaced, but no layer ran (as if it no longer called it)
    with pytest.raises(RuntimeError, match="no call of the model reached the original kernel"):
        original_kernel.check_calls(counter)


def test_loading_names_what_is_missing(original_kernel, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        original_kernel.load_original(str(tmp_path / "MultiScaleDeformableAttention.so"))
    empty = tmp_path / "not_the_original.py"
    empty.write_text("def ms_deform_attn_forward(*args):\n    pass\n")
    with pytest.raises(ImportError, match="has no ms_deform_attn_backward"):
        original_kernel.load_original(str(empty))
