"""Checkpoint files: atomic writes, safe loading, and the RNG state of every rank.

A training checkpoint is a dict with the keys DETR-style code expects
(``model``, ``optimizer``, ``lr_scheduler``, ``epoch`` = last finished epoch)
plus ours:
  ``format``        "detr_cuda/1"
  ``scaler``        GradScaler state (fp16) or None
  ``ema``           ModelEMA state or None
  ``next_epoch``, ``next_batch``: where training continues (batch index inside the epoch)
  ``step``          optimizer steps taken so far
  ``best_ap``       best COCO AP seen so far (or None)
  ``bad_steps``     non-finite steps tolerated so far
  ``rng``           list (one per rank) of RNG states: python, numpy, torch cpu, torch cuda
  ``config``        the resolved config as a plain dict
  ``category_map``  {"ids": [category id of label 0..K-1], "names": [...]}
Everything is stored as tensors, numbers, strings, lists and dicts, so the file
loads with ``torch.load(weights_only=True)``.
"""
import argparse
import os
import random
import tempfile
import warnings

import numpy as np
import torch

FORMAT = "detr_cuda/1"
LAST_NAME = "checkpoint_last.pth"
BEST_NAME = "checkpoint_best.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: unreadable (truncated, not a torch file) or not of the kind needed.

    The message names the path; tools turn it into exit code 2 without a traceback.
    """


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash during the write leaves the previous file intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_file(path):
    """Loads a checkpoint on the CPU without executing arbitrary pickled code where possible.

    Our checkpoints load with ``weights_only=True``. The official Deformable DETR
    files also pickle an ``argparse.Namespace``, which is allow-listed; anything
    else falls back to a full unpickle with a warning.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling error names the offending global
        if "weights_only" not in str(error) and "Unsupported global" not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file?): "
                                  f"{str(error).splitlines()[0]}") from error
        warnings.warn(f"{path} pickles Python objects beyond tensors ({str(error).splitlines()[0]}); "
                      "loading it with weights_only=False. Only load checkpoints you trust.", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from error


def capture_rng_state():
    """RNG state of this process as weights_only-loadable values."""
    version, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [version, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def restore_rng_state(state):
    version, keys, position, has_gauss, cached_gaussian = state["numpy"]
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np.random.set_state((version, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_resume_checkpoint(output_dir):
    """checkpoint_last.pth in ``output_dir`` or None (for ``--resume auto``)."""
    candidate = os.path.join(output_dir, LAST_NAME)
    return candidate if os.path.isfile(candidate) else None


def check_training_checkpoint(checkpoint, path):
    """Raises a clear error when ``checkpoint`` cannot be resumed from."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a detr_cuda training checkpoint (no format={FORMAT!r}); --resume continues one of "
            "our runs exactly. To start from other weights (e.g. an official Deformable DETR file) use --weights.")
