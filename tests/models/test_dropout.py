"""The CPU dropout (models/dropout.py): the plain formula x * keep / (1 - p), its gradient, the keep
rate, and a stream that follows the default generator."""
import math

import pytest
import torch

from detr_cuda.models.dropout import Dropout, dropout, scaled_keep_mask


def test_output_and_gradient_are_the_formula_with_the_drawn_mask():
    p = 0.1
    x = torch.randn(3, 50, 64, requires_grad=True)
    grad = torch.randn(3, 50, 64)
    torch.manual_seed(7)
    out = dropout(x, p)
    out.backward(grad)
    torch.manual_seed(7)
    mask = scaled_keep_mask(x.shape, p)
    keep = mask != 0
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert mask.dtype == torch.float32 and mask.shape == x.shape
    assert torch.equal(mask, torch.where(keep, scale, 0.0))  # exactly 0 or float32(1 / (1 - p))
    assert torch.equal(out, torch.where(keep, x.detach() * scale, 0.0))
    assert torch.equal(x.grad, torch.where(keep, grad * scale, 0.0))
    assert 0 < keep.sum() < keep.numel()


@pytest.mark.parametrize("p", [1e-12, 0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    count = 1_000_001  # odd: the last element takes half of a 64-bit draw
    kept = (scaled_keep_mask((count,), p, torch.Generator().manual_seed(0)) != 0).sum().item()
    sigma = math.sqrt(count * p * (1 - p))
    assert abs(kept - count * (1 - p)) <= 5 * sigma + 1e-6


def test_keep_probability_is_exact_at_the_threshold():
    # keep iff the 32 bits (as int32) < (1 - p) * 2^32 - 2^31: with p = 0.5 exactly the sign bit.
    keep = scaled_keep_mask((4, 1000), 0.5, torch.Generator().manual_seed(3)) != 0
    words = torch.empty(2000, dtype=torch.int64).random_(-2 ** 63, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(keep.flatten(), words.view(torch.int32) < 0)


def test_stream_follows_the_default_generator():
    x = torch.ones(1000)
    torch.manual_seed(11)
    first, second = dropout(x, 0.3), dropout(x, 0.3)
    torch.manual_seed(11)
    assert torch.equal(dropout(x, 0.3), first) and torch.equal(dropout(x, 0.3), second)
    assert not torch.equal(first, second)


def test_half_precision_input_keeps_its_dtype():
    x = torch.randn(64, 32).to(torch.bfloat16)
    torch.manual_seed(5)
    out = dropout(x, 0.2)
    torch.manual_seed(5)
    mask = scaled_keep_mask(x.shape, 0.2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x * mask.to(torch.bfloat16))


def test_identity_in_eval_or_without_dropout():
    x = torch.randn(4, 5)
    module = Dropout(0.2).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert module.state_dict() == {} and list(module.parameters()) == []
