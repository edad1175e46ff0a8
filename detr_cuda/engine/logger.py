"""Run logging: console lines, ``log.jsonl`` and TensorBoard scalars (rank 0 writes), and the
running sums of the loss terms between log lines.

``log.jsonl`` holds one JSON object per line with a ``type`` key:
  "run":            world size and environment (versions, device, git commit);
  "train_interval": averages over the steps since the last line (the loss and each loss term, lr per
                    parameter group, grad_norm, data and step time, peak memory);
  "epoch":          the epoch's averages (``train_<term>``) plus ``test_coco_eval_bbox`` (the 12 COCO
                    stats) when the epoch ended with an evaluation;
  "eval":           the evaluation summary of the epoch that was just trained (``epoch``).
TensorBoard events go to ``<output_dir>/tensorboard``.
"""
import json
import math
import os
import sys
import time

import torch


class RunLogger:
    def __init__(self, output_dir, enabled, tensorboard=True):
        self.enabled = enabled
        self.output_dir = output_dir
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "log.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # tensorboard is a listed dependency; say so if it is missing
                self.info(f"TensorBoard logging disabled: {error}")
            else:
                self.writer = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))

    def info(self, message):
        if self.enabled:
            print(message, flush=True)

    def record(self, kind, values):
        """One JSON line; non-finite numbers become strings so the line stays valid JSON."""
        if not self.enabled:
            return
        clean = {"type": kind, "time": round(time.time(), 3)}
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            clean[key] = value
        self.jsonl.write(json.dumps(clean) + "\n")

    def scalars(self, prefix, values, step):
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


class Meter:
    """Sums of named scalars kept on the device, read (one host sync) only when a mean is asked for.

    ``add`` takes {name: 0-d tensor} with the same names every time (a training run's loss terms);
    the sums are float64, so the means equal those of Python floats added in the same order.
    """

    def __init__(self):
        self.names, self.sums, self.count = None, None, 0

    def add(self, values):
        names = tuple(values)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"Meter: got terms {sorted(names)}, expected {sorted(self.names)}")
        stacked = torch.stack([value.detach().float() for value in values.values()]).double()
        self.sums = stacked if self.sums is None else self.sums + stacked
        self.count += 1

    def mean(self):
        """{name: float}; empty when nothing was added."""
        if self.sums is None:
            return {}
        return {name: value / self.count for name, value in zip(self.names, self.sums.tolist())}


def main_terms(values):
    """Loss terms of the last decoder layer (no _0.._N / _enc suffix), for the console line."""
    return {k: v for k, v in values.items()
            if k.startswith("loss_") and not k.rsplit("_", 1)[-1].isdigit() and not k.endswith("_enc")}


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def memory_megabytes(device):
    """Peak memory of this process: CUDA allocated on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20
    except ImportError:
        return float("nan")
