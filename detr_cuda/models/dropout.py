"""Dropout with cheaper masks on the CPU: same semantics as ``nn.Dropout``, another random stream.

Why: torch's CPU dropout draws its mask with ``bernoulli_(1 - p)``, which (torch 2.x release builds,
whose MKL path is disabled) runs on one thread and turns two 32-bit mt19937 draws into a double per
element, then divides the mask by ``1 - p`` and multiplies: in a CPU training step of Deformable DETR
that serial loop was the largest single operator. Here every element gets 32 random bits from
``random_`` over the full int64 range (one 64-bit draw per two elements, no floating point), and two
vectorised in-place integer passes turn them into the float mask: ``bits < (1 - p) * 2**32`` gives
0 or 1, times the bit pattern of ``1 / (1 - p)`` gives 0.0 or that float. So the keep-probability is
``1 - p`` to within 2**-32 and kept values are scaled by ``1 / (1 - p)``, as in torch; autograd saves
the same 4-byte mask torch saves.

The bits come from the default CPU generator, so a seeded run draws the same masks every time and an
exact resume (which restores that generator) continues the same stream; the masks are not the ones
``nn.Dropout`` would draw. Other devices and float64 use torch's own dropout unchanged.
"""
import struct

import torch
import torch.nn.functional as F
from torch import nn

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scaled_keep_mask(shape, p, generator=None):
    """float32 tensor of ``shape`` on the CPU: ``1 / (1 - p)`` with probability ``1 - p`` (to 2**-32),
    else 0. ``0 <= p < 1``."""
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + 1) // 2, dtype=torch.int64)
    words.random_(-2 ** 63, None, generator=generator)  # every int64, so each int32 half is uniform
    bits = words.view(torch.int32)[:count].view(shape)
    threshold = min(round((1.0 - p) * 2 ** 32) - 2 ** 31, 2 ** 31 - 1)
    scale_bits = struct.unpack("<i", struct.pack("<f", 1.0 / (1.0 - p)))[0]
    return bits.lt_(threshold).mul_(scale_bits).view(torch.float32)


def dropout(x, p, training=True, generator=None):
    """``F.dropout(x, p, training)``, with :func:`scaled_keep_mask` masks on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or x.dtype not in _FAST_DTYPES or p == 1.0:
        return F.dropout(x, p, training)
    return x * scaled_keep_mask(x.shape, p, generator).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same argument, no parameters or buffers) running :func:`dropout`."""

    def forward(self, x):
        return dropout(x, self.p, self.training)
