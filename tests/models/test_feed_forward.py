import torch
from torch import nn

from detr_cuda.models.dropout import Dropout
from detr_cuda.models.feed_forward import ReluDropoutFeedForward, feed_forward


def plain(x, linear1, dropout, linear2):
    return linear2(dropout(torch.relu(linear1(x))))


def block(d_model=16, d_ffn=40, p=0.3):
    torch.manual_seed(0)
    return nn.Linear(d_model, d_ffn), Dropout(p), nn.Linear(d_ffn, d_model)


def test_gradients_in_float64_with_a_mask():
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
