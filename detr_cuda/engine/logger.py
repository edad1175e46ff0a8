"""Run logging: console lines, ``log.jsonl`` and TensorBoard scalars. Only rank 0 writes.

``log.jsonl`` holds one JSON object per line with a ``type`` key:
  "train_interval": iteration-level averages (losses, each loss term, lr, grad_norm, times, memory);
  "epoch":          epoch averages plus ``test_coco_eval_bbox`` (the 12 COCO stats) when evaluated;
  "eval":           the evaluation summary.
TensorBoard events go to ``<output_dir>/tensorboard``.
"""
import json
import math
import os
import sys
import time


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


def format_seconds(seconds):
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def memory_megabytes(device):
    """Peak memory of this process: CUDA allocated on GPU, max resident set size on CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20
    except ImportError:
        return float("nan")
