"""The layers' feed-forward block, ``linear2(dropout(relu(linear1(x))))``, keeping one hidden tensor.

Why: autograd keeps three (tokens, d_ffn) tensors per layer for this block when dropout is on: the
ReLU's output (for its backward), the dropout mask, and the masked hidden (linear2's input). In a
CPU training step of Deformable DETR at short side 512 those are ~0.2 GB per encoder layer. The
masked hidden alone is enough: it is nonzero exactly where the ReLU passed and the mask kept, and
there the derivative of ``dropout(relu(.))`` is the mask's scale ``1 / (1 - p)``.

The forward is the same operations on the same values as the three modules (bitwise equal, and the
same dropout mask from the same random stream); the backward computes the same gradients up to the
order of float sums. Used where the cheap CPU dropout runs (:mod:`.dropout`: CPU, float32, no
autocast) and dropout is active; everywhere else the plain modules run.
"""
import torch
import torch.nn.functional as F

from .dropout import scaled_keep_mask


class ReluDropoutFeedForward(torch.autograd.Function):
    """forward(x (N, C), w1 (F, C), b1 (F,), w2 (C, F), b2 (C,), mask (N, F) of 0 or scale, scale)
    -> (N, C). Saves x, the weights and the masked hidden (N, F)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, mask, scale):
        hidden = torch.addmm(b1, x, w1.t()).relu_().mul_(mask)
        ctx.save_for_backward(x, w1, w2, hidden)
        ctx.scale = scale
        return torch.addmm(b2, hidden, w2.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2, hidden = ctx.saved_tensors
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if ctx.needs_input_grad[3]:
            grad_w2 = grad_out.t().mm(hidden)
        if ctx.needs_input_grad[4]:
            grad_b2 = grad_out.sum(0)
        # d hidden / d (x w1^T + b1): the scale where hidden > 0 (ReLU passed, mask kept), else 0; the
        # gate is ReLU's own backward kernel, written in place (one pass, no boolean temporary).
        grad_hidden = grad_out.mm(w2)
        grad_pre = torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0, grad_input=grad_hidden)
        grad_pre.mul_(ctx.scale)
        if ctx.needs_input_grad[0]:
            grad_x = grad_pre.mm(w1)
        if ctx.needs_input_grad[1]:
            grad_w1 = grad_pre.t().mm(x)
        if ctx.needs_input_grad[2]:
            grad_b1 = grad_pre.sum(0)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def feed_forward(x, linear1, dropout, linear2):
    """``linear2(dropout(relu(linear1(x))))``; x: (..., C) -> (..., C). ``dropout``: an nn.Dropout."""
    p = dropout.p if dropout.training else 0.0
    fused = (0.0 < p < 1.0 and torch.is_grad_enabled() and x.device.type == "cpu"
             and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
             and linear1.bias is not None and linear2.bias is not None)
    if not fused:
        return linear2(dropout(F.relu(linear1(x))))
    rows = x.reshape(-1, x.shape[-1])
    mask = scaled_keep_mask((rows.shape[0], linear1.out_features), p)
    out = ReluDropoutFeedForward.apply(rows, linear1.weight, linear1.bias, linear2.weight, linear2.bias, mask,
                                       1.0 / (1.0 - p))
    return out.view(*x.shape[:-1], linear2.out_features)
