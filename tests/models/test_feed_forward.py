import pytest
import torch
from torch import nn

from detr_cuda.models.dropout import Dropout
from detr_cuda.models.feed_forward import ReluDropoutFeedForward, feed_forward


def plain(x, linear1, dropout, linear2):
    return linear2(dropout(torch.relu(linear1(x))))


def block(d_model=16, d_ffn=40, p=0.3):
    torch.manual_seed(0)
    return nn.Linear(d_model, d_ffn), Dropout(p), nn.Linear(d_ffn, d_model)


def small_blocks(monkeypatch, rows):
    import detr_cuda.models.feed_forward as module
    monkeypatch.setattr(module, "CPU_ROWS_PER_BLOCK", rows)


def test_gradients_in_float64_with_a_mask(monkeypatch):
    small_blocks(monkeypatch, 3)  # the backward's blocks: 3, 3, 1 rows
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(9, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(9, generator=generator, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    scale = 1 / 0.7
    mask = (torch.rand(7, 9, generator=generator) < 0.7).double() * scale
    assert 0 < int((mask == 0).sum()) < mask.numel()
    assert torch.autograd.gradcheck(lambda *a: ReluDropoutFeedForward.apply(*a, mask, scale), (x, w1, b1, w2, b2))


def test_training_forward_is_bitwise_the_modules_and_gradients_match():
    linear1, dropout, linear2 = block()
    x = torch.randn(6, 3, 16, requires_grad=True)
    outputs, grads = [], []
    for function in (plain, feed_forward):
        torch.manual_seed(5)  # the same dropout mask for both
        out = function(x, linear1, dropout, linear2)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (x, linear1.weight, linear1.bias, linear2.weight,
                                                               linear2.bias)))
    assert torch.equal(outputs[0], outputs[1])
    for mine, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def saved_bytes(function, *args):
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*args).sum().backward()
    return sum(total)


def test_one_hidden_tensor_is_kept_instead_of_three():
    linear1, dropout, linear2 = block(d_model=8, d_ffn=256)
    x = torch.randn(512, 8, requires_grad=True)
    hidden_bytes = 512 * 256 * 4
    assert saved_bytes(plain, x, linear1, dropout, linear2) >= 3 * hidden_bytes
    assert saved_bytes(feed_forward, x, linear1, dropout, linear2) < 1.2 * hidden_bytes


def test_where_the_fused_block_does_not_apply_the_modules_run():
    linear1, dropout, linear2 = block()
    x = torch.randn(4, 16)
    dropout.eval()
    assert torch.equal(feed_forward(x, linear1, dropout, linear2), plain(x, linear1, dropout, linear2))
    dropout.train()
    with torch.no_grad():
        torch.manual_seed(2)
        expected = plain(x, linear1, dropout, linear2)
        torch.manual_seed(2)
        assert torch.equal(feed_forward(x, linear1, dropout, linear2), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        expected = plain(x, linear1, dropout, linear2)
        torch.manual_seed(3)
        out = feed_forward(x, linear1, dropout, linear2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_without_dropout_the_relu_and_its_gate_run_in_place_and_match_the_modules():
    linear1, dropout, linear2 = block(p=0.0)
    x = torch.randn(6, 3, 16, requires_grad=True)
    params = (x, linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    expected = plain(x, linear1, dropout, linear2)
    out = feed_forward(x, linear1, dropout, linear2)
    assert torch.equal(out, expected)
    for mine, theirs in zip(torch.autograd.grad(out.square().sum(), params),
                            torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert saved_bytes(feed_forward, x, linear1, dropout, linear2) < saved_bytes(plain, x, linear1, dropout, linear2)


def test_recompute_gradients_in_float64_over_several_blocks(monkeypatch):
    small_blocks(monkeypatch, 5)
    generator = torch.Generator().manual_seed(2)
    args = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
            for shape in [(13, 6), (9, 6), (9,), (6, 9), (6,)]]  # 13 rows: blocks of 5, 5, 3
    assert torch.autograd.gradcheck(lambda *a: ReluDropoutFeedForward.apply(*a, None, 1.0, True), args)


@pytest.mark.parametrize("rows_per_block", [7, 1024])
def test_recompute_equals_the_modules_and_keeps_no_hidden_tensor(monkeypatch, rows_per_block):
    small_blocks(monkeypatch, rows_per_block)
    linear1, dropout, linear2 = block(d_model=8, d_ffn=256, p=0.0)
    x = torch.randn(2, 50, 8, requires_grad=True)
    params = (x, linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    expected = plain(x, linear1, dropout, linear2)
    out = feed_forward(x, linear1, dropout, linear2, recompute=True)
    if rows_per_block >= 100:  # one block: the same products as the modules
        assert torch.equal(out, expected)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(torch.autograd.grad(out.square().sum(), params),
                            torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    hidden_bytes = 100 * 256 * 4
    assert saved_bytes(feed_forward, x, linear1, dropout, linear2) >= hidden_bytes
    assert saved_bytes(lambda *a: feed_forward(*a, recompute=True), x, linear1, dropout, linear2) < hidden_bytes / 4


def test_recompute_is_ignored_with_dropout_and_refused_by_the_function():
    linear1, dropout, linear2 = block(p=0.3)
    x = torch.randn(6, 16, requires_grad=True)
    torch.manual_seed(4)
    expected = feed_forward(x, linear1, dropout, linear2)
    torch.manual_seed(4)
    assert torch.equal(feed_forward(x, linear1, dropout, linear2, recompute=True), expected)
    with pytest.raises(ValueError, match="recompute needs mask=None"):
        ReluDropoutFeedForward.apply(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias,
                                     torch.ones(6, 40), 1.0, True)


def test_a_model_without_dropout_trains_the_same_with_and_without_recompute(monkeypatch):
    from detr_cuda.models import build_model
    from tests.support.configs import tiny_model_config
    from tests.support.models import padded_batch
    small_blocks(monkeypatch, 64)  # the 96 x 128 image's 252 encoder tokens: 4 blocks
    results = []
    for mode in ("never", "cpu"):
        torch.manual_seed(0)
        model, _, _ = build_model(tiny_model_config("model.dropout=0.0", f"model.ffn_recompute={mode}"), 4)
        assert all(layer.ffn_recompute == mode for layer in model.transformer.encoder.layers)
        model.train()
        images, mask = padded_batch([(96, 128)])
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(images, mask)
        loss = outputs["pred_logits"].square().sum() + outputs["pred_boxes"].sum()
        parameters = [p for p in model.parameters() if p.requires_grad]
        results.append((outputs["pred_logits"], torch.autograd.grad(loss, parameters), sum(saved)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    ffn_hidden_bytes = 256 * 64 * 4  # 256 encoder tokens x dim_feedforward 64, the one encoder layer
    assert results[0][2] - results[1][2] >= 0.9 * ffn_hidden_bytes


def test_ffn_recompute_modes():
    from detr_cuda.config import ConfigError
    from detr_cuda.models.deformable_encoder import DeformableTransformerEncoderLayer
    from tests.support.configs import tiny_model_config
    with pytest.raises(ConfigError, match="model.ffn_recompute: 'sometimes' is not one of cpu, always, never"):
        tiny_model_config("model.ffn_recompute=sometimes")
    with pytest.raises(ValueError, match="ffn_recompute must be"):
        DeformableTransformerEncoderLayer(ffn_recompute=True)
