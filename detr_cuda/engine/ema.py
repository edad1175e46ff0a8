"""Exponential moving average of model weights (optional, ``train.ema``)."""
import copy

import torch


class ModelEMA:
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so that an
    early EMA is not dominated by the random initialisation. Buffers (e.g.
    frozen BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            current = source[name].detach()
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(current.to(value.dtype), alpha=1.0 - decay)
            else:
                value.copy_(current)

    def state_dict(self):
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.decay = state["decay"]
        self.updates = state["updates"]
