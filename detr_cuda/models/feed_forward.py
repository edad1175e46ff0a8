"""The layers' feed-forward block, ``linear2(dropout(relu(linear1(x))))``, keeping one hidden tensor
(or none, recomputing it in the backward).

Why: autograd keeps three (tokens, d_ffn) tensors per layer for this block when dropout is on: the
ReLU's output (for its backward), the dropout mask, and the masked hidden (linear2's input). In a
CPU training step of Deformable DETR at short side 512 those are ~0.2 GB per encoder layer. The
masked hidden alone is enough: it is nonzero exactly where the ReLU passed and the mask kept, and
there the derivative of ``dropout(relu(.))`` is the mask's scale ``1 / (1 - p)``. Without dropout
(DN-DETR's recipe) the block is the same with no mask; the ReLU then runs in place on linear1's
output, and its backward gate in place on the incoming gradient, so no step allocates a second
hidden-sized buffer. The backward runs over blocks of rows through small reused buffers.

``recompute=True`` (no dropout only; ``model.ffn_recompute``, by default on the CPU, asks it for the
encoder layers) keeps no hidden tensor at all: the forward runs the block over blocks of rows through one
small reused hidden buffer, and the backward recomputes each block's hidden from the block's input
with linear1 (one more (rows, C) x (C, d_ffn) product, about 1/6 of the block's matrix work). Large
fresh buffers cost page faults on the CPU, so there the blocked passes lose little or no time (on a
GPU the extra product is a plain trade of time for memory). DN training
step on the CPU (R50, 2 images): peak resident memory 2317 -> 2083 MiB at short side 320 and
3986 -> 3406 MiB at 512, step time unchanged at 320 and ~7 % faster at 512 (benchmarks/RESULTS.md).

The forward is the same operations on the same values as the modules (bitwise equal, and the same
dropout mask from the same random stream; blocked, equal up to float rounding); the backward
computes the same gradients up to the order of float sums (a recomputed hidden block is bitwise the
blocked forward's: the same product on the same rows). Used where autocast is off and gradients are
recorded; with dropout active, only where the cheap CPU dropout runs (:mod:`.dropout`: CPU,
float32). Everywhere else the plain modules run.
"""
import torch
import torch.nn.functional as F

from .dropout import scaled_keep_mask


# Rows per block of the blocked passes. On the CPU a 1024 x 2048 float hidden block (8 MiB) is reused
# from block to block; on a GPU larger blocks keep the kernel launches few.
CPU_ROWS_PER_BLOCK = 1024
GPU_ROWS_PER_BLOCK = 16384


def _hidden(x, w1, b1, out=None):
    """relu(x w1^T + b1) (N, F), the ReLU in place on the product."""
    return torch.addmm(b1, x, w1.t(), out=out).relu_()


def _block_rows(x):
    rows = CPU_ROWS_PER_BLOCK if x.device.type == "cpu" else GPU_ROWS_PER_BLOCK
    return min(rows, max(x.shape[0], 1))


def _blocks(x):
    """Row slices of x (N, C), ``_block_rows(x)`` rows each (the last one shorter)."""
    step = _block_rows(x)
    return [slice(start, min(start + step, x.shape[0])) for start in range(0, x.shape[0], step)]


class ReluDropoutFeedForward(torch.autograd.Function):
    """forward(x (N, C), w1 (F, C), b1 (F,), w2 (C, F), b2 (C,), mask (N, F) of 0 or scale, or None,
    scale, recompute) -> (N, C). Saves x, the weights and the (masked) hidden (N, F); with
    ``recompute`` (mask None) b1 instead of the hidden, which the backward recomputes block by block."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, mask, scale, recompute=False):
        if recompute and mask is not None:
            raise ValueError("ReluDropoutFeedForward: recompute needs mask=None (no dropout)")
        ctx.recompute = recompute
        ctx.scale = scale
        if recompute:
            ctx.save_for_backward(x, w1, w2, b1)
            out = x.new_empty(x.shape[0], w2.shape[0])
            buffer = x.new_empty(_block_rows(x), w1.shape[0])
            for rows in _blocks(x):
                hidden = _hidden(x[rows], w1, b1, out=buffer[:rows.stop - rows.start])
                torch.addmm(b2, hidden, w2.t(), out=out[rows])
            return out
        hidden = _hidden(x, w1, b1)
        if mask is not None:
            hidden.mul_(mask)
        ctx.save_for_backward(x, w1, w2, hidden)
        return torch.addmm(b2, hidden, w2.t())

    @staticmethod
    def backward(ctx, grad_out):
        """Block by block (``_blocks``): each block's hidden (sliced from the saved one, or
        recomputed into one small buffer), its gradient in one small buffer, the weight gradients
        summed over the blocks. No hidden-sized temporary is allocated."""
        x, w1, w2, saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_x = x.new_empty(x.shape) if needs[0] else None
        grad_w1 = w1.new_zeros(w1.shape) if needs[1] else None
        grad_b1 = w1.new_zeros(w1.shape[0]) if needs[2] else None
        grad_w2 = w2.new_zeros(w2.shape) if needs[3] else None
        size = (_block_rows(x), w1.shape[0])
        hidden_buffer = x.new_empty(size) if ctx.recompute else None
        grad_buffer = x.new_empty(size)
        for rows in _blocks(x):
            count = rows.stop - rows.start
            hidden = _hidden(x[rows], w1, saved, out=hidden_buffer[:count]) if ctx.recompute else saved[rows]
            if grad_w2 is not None:
                grad_w2.addmm_(grad_out[rows].t(), hidden)
            # d hidden / d (x w1^T + b1): the scale where hidden > 0 (ReLU passed, mask kept), else 0;
            # the gate is ReLU's own backward kernel, written in place (one pass, no boolean temporary).
            grad_pre = torch.mm(grad_out[rows], w2, out=grad_buffer[:count])
            torch.ops.aten.threshold_backward.grad_input(grad_pre, hidden, 0, grad_input=grad_pre)
            if ctx.scale != 1.0:
                grad_pre.mul_(ctx.scale)
            if grad_x is not None:
                torch.mm(grad_pre, w1, out=grad_x[rows])
            if grad_w1 is not None:
                grad_w1.addmm_(grad_pre.t(), x[rows])
            if grad_b1 is not None:
                grad_b1.add_(grad_pre.sum(0))
        grad_b2 = grad_out.sum(0) if needs[4] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def feed_forward(x, linear1, dropout, linear2, recompute=False):
    """``linear2(dropout(relu(linear1(x))))``; x: (..., C) -> (..., C). ``dropout``: an nn.Dropout.
    ``recompute``: keep no hidden tensor for the backward where there is no dropout (see the module
    docstring); ignored with dropout active."""
    p = dropout.p if dropout.training else 0.0
    fused = (p < 1.0 and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
             and linear1.bias is not None and linear2.bias is not None
             and (p == 0.0 or (x.device.type == "cpu" and x.dtype == torch.float32)))
    if not fused:
        return linear2(dropout(F.relu(linear1(x), inplace=True)))  # linear1's output is its own
    rows = x.reshape(-1, x.shape[-1])
    if p == 0.0:
        mask, scale = None, 1.0
    else:
        mask, scale, recompute = scaled_keep_mask((rows.shape[0], linear1.out_features), p), 1.0 / (1.0 - p), False
    out = ReluDropoutFeedForward.apply(rows, linear1.weight, linear1.bias, linear2.weight, linear2.bias, mask,
                                       scale, recompute)
    return out.view(*x.shape[:-1], linear2.out_features)
