"""The decoder's query self-attention: nn.MultiheadAttention's result with a per-image mask that is
broadcast over the heads (not repeated per head), and the transformer's mask checks."""
import pytest
import torch
from torch import nn

from detr_cuda.models import build_model
from detr_cuda.models.deformable_decoder import attention_bias, query_self_attention
from tests.support.configs import tiny_model_config

BATCH, TOKENS, CHANNELS, HEADS = 2, 37, 32, 8


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    query_key = torch.randn(BATCH, TOKENS, CHANNELS, generator=generator, requires_grad=True)
    value = torch.randn(BATCH, TOKENS, CHANNELS, generator=generator, requires_grad=True)
    mask = torch.rand(BATCH, TOKENS, TOKENS, generator=generator) < 0.3
    mask[:, :, 0] = False  # every query sees at least one key
    return query_key, value, mask


def module_result(attention, query_key, value, mask):
    """What the decoder layer called before: nn.MultiheadAttention, sequence first, the mask repeated per head."""
    if mask is not None and mask.dim() == 3 and mask.shape[0] == BATCH:
        mask = mask.repeat_interleave(HEADS, dim=0)
    return attention(query_key.transpose(0, 1), query_key.transpose(0, 1), value.transpose(0, 1),
                     attn_mask=mask, need_weights=False)[0].transpose(0, 1)


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_image", "per_head"])
def test_equals_multihead_attention(mask_kind):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(CHANNELS, HEADS)
    query_key, value, mask = inputs()
    mask = {"none": None, "shared": mask[0], "per_image": mask,
            "per_head": mask.repeat_interleave(HEADS, dim=0)}[mask_kind]
    expected = module_result(attention, query_key, value, mask)
    out = query_self_attention(attention, query_key, value, mask)
    assert torch.equal(out, expected)
    params = (query_key, value, attention.in_proj_weight, attention.in_proj_bias, attention.out_proj.weight)
    for mine, theirs in zip(torch.autograd.grad(out.square().sum(), params),
                            torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_attention_dropout_draws_the_same_masks():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(CHANNELS, HEADS, dropout=0.2)
    query_key, value, mask = inputs(1)
    torch.manual_seed(7)
    expected = module_result(attention, query_key, value, mask)
    torch.manual_seed(7)
    assert torch.equal(query_self_attention(attention, query_key, value, mask), expected)
    attention.eval()
    assert torch.equal(query_self_attention(attention, query_key, value, mask),
                       module_result(attention, query_key, value, mask))


def test_attention_bias_is_minus_infinity_where_blocked_and_shared_by_the_heads():
    _, _, mask = inputs()
    bias = attention_bias(mask, BATCH, HEADS, torch.float32)
    assert bias.shape == (BATCH, 1, TOKENS, TOKENS)
    assert torch.equal(torch.isinf(bias[:, 0]), mask) and (bias[~mask[:, None]] == 0).all()
    assert attention_bias(bias, BATCH, HEADS, torch.float32) is bias  # already additive
    assert attention_bias(None, BATCH, HEADS, torch.float32) is None
    per_head = attention_bias(mask.repeat_interleave(HEADS, 0), BATCH, HEADS, torch.float32)
    assert per_head.shape == (BATCH, HEADS, TOKENS, TOKENS)


def test_the_transformer_names_a_mask_of_the_wrong_shape():
    model, _, _ = build_model(tiny_model_config(), 4)
    transformer = model.transformer
    heads = transformer.nhead
    for good, shape in [((10, 10), (10, 10)), ((2, 10, 10), (2, 1, 10, 10)),
                        ((2 * heads, 10, 10), (2, heads, 10, 10))]:
        bias = transformer.attention_bias(torch.zeros(good, dtype=torch.bool), 2, 10, torch.float32)
        assert bias.shape == shape
    for bad in [(10,), (3, 10, 10), (2, 10, 9), (1, 2, 10, 10)]:
        with pytest.raises(ValueError, match=rf"self_attn_mask must be .*got {tuple(bad)}".replace("(", r"\(")
                           .replace(")", r"\)")):
            transformer.attention_bias(torch.zeros(bad, dtype=torch.bool), 2, 10, torch.float32)
