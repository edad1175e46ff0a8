"""Checkpoint files: the one loader and its pickle policy, atomic writes, and the weights inside.

Layouts understood:
- ours (``format`` = FORMAT): ``model`` (state dict), ``ema`` ({"module": state dict, ...} or
  None), ``config`` (the resolved config as a dict), ``category_map`` (read only through
  :meth:`CategoryMap.from_checkpoint`) and the training state (engine/trainer.py writes it);
- the official Deformable DETR / DN-DETR / DINO releases: ``model`` plus ``optimizer``,
  ``lr_scheduler``, ``epoch`` and ``args`` (an ``argparse.Namespace``);
- a plain state dict (name -> tensor).

Loading never runs code pickled in a file: :func:`load_file` is ``torch.load(weights_only=True)``
with exactly one class allowed beyond tensors and plain containers, ``argparse.Namespace`` (the
official releases' ``args``). A file that needs anything else is refused with a message naming
the offending global and the file; there is no fallback to unrestricted unpickling.

:func:`load_weights` copies a file's weights into a model and reports what it did: class rows
(``class_embed``) and the DN label book (``label_enc``) are matched by category, by name where
both sides name their categories (:meth:`CategoryMap.rows_for`), so a row keeps its meaning
whatever the two label orders are.
"""
import argparse
import dataclasses
import os
import pickle
import re
import tempfile
from typing import List

import torch

from .categories import OFFICIAL_COCO_NUM_CLASSES, CategoryMap

FORMAT = "detr_cuda/1"
LAST_NAME = "checkpoint_last.pth"
BEST_NAME = "checkpoint_best.pth"
# Written beside checkpoint_last.pth (never over it) when training stops on a non-finite loss.
NON_FINITE_NAME = "checkpoint_non_finite.pth"

# Keys left behind by FLOP counters in some released files; never model weights.
_IGNORED_SUFFIXES = ("total_ops", "total_params")
# With box refinement / two-stage the decoder holds the detector's head lists, so both names are the same
# tensors; a file may carry either.
_ALIASED_PREFIXES = (("transformer.decoder.bbox_embed.", "bbox_embed."),
                     ("transformer.decoder.class_embed.", "class_embed."))
_CLASS_HEAD = re.compile(r"class_embed(\.\d+)?\.(weight|bias)$")
_LABEL_BOOK = re.compile(r"(^|\.)label_enc\.weight$")
_TEMPORARY = re.compile(r"\.pth\.[^.]+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: unreadable, unsafe, or not of the kind needed. The message
    names the path; the tools turn it into exit code 2 without a traceback."""


class WeightsMismatch(CheckpointError):
    """Weights that do not make a complete model for inference (see :func:`load_for_inference`)."""


def load_file(path):
    """The object stored in ``path``, loaded on the CPU without running any pickled code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "weights_only" in text:
            offending = found.group(1) if found else "an object other than tensors"
            raise CheckpointError(
                f"refusing to load {path}: it pickles {offending}, which could run code when loaded. A checkpoint "
                "may hold only tensors, numbers, strings, lists, dicts and argparse.Namespace (the official "
                "releases' 'args'); re-save it as a plain state dict from a trusted environment") from None
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file?): "
                              f"{text.splitlines()[0] if text else type(error).__name__}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file?): {first}") from None


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash during the write leaves the previous file intact (and a ``*.tmp`` file that
    :func:`remove_stale_temporaries` deletes on the next start).
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


def remove_stale_temporaries(folder):
    """Deletes the ``<name>.pth.<random>.tmp`` files that killed writes left in ``folder``; returns them."""
    if not os.path.isdir(folder):
        return []
    stale = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if _TEMPORARY.search(name)]
    for path in stale:
        os.remove(path)
    return stale


def is_training_checkpoint(checkpoint):
    return isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT


def model_state(checkpoint, prefer_ema=False):
    """(state dict, description) of the model weights in any layout above: ours (the EMA weights
    when ``prefer_ema`` and the run kept them), a ``model`` entry, or a plain state dict. DDP's
    ``module.`` prefixes and FLOP-counter keys are removed."""
    if is_training_checkpoint(checkpoint):
        if prefer_ema and checkpoint.get("ema") is not None:
            state, description = checkpoint["ema"]["module"], "detr_cuda checkpoint (EMA weights)"
        else:
            state, description = checkpoint["model"], "detr_cuda checkpoint"
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state, description = checkpoint["model"], "DETR-style checkpoint ('model' entry)"
    elif isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        state, description = checkpoint, "plain state dict"
    else:
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"unrecognised checkpoint layout: no 'model' state dict and not a state dict ({keys})")
    cleaned = {}
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned, description


def fill_aliases(state, keys):
    """Adds to ``state`` the keys of ``keys`` it lacks under one name but holds under its alias."""
    for key in keys:
        if key in state:
            continue
        for first, second in _ALIASED_PREFIXES:
            for own, other in ((first, second), (second, first)):
                if key.startswith(own) and other + key[len(own):] in state:
                    state[key] = state[other + key[len(own):]]


def class_rows(state):
    """Rows of the class head in a state dict (None when it has none)."""
    for key, value in state.items():
        if _CLASS_HEAD.search(key) and key.endswith("weight"):
            return int(value.shape[0])
    return None


def file_categories(checkpoint, state):
    """What the file's class rows mean: its stored CategoryMap, the COCO id table for an official
    91-row head, else None."""
    stored = CategoryMap.from_checkpoint(checkpoint)
    if stored is not None:
        return stored
    if class_rows(state) == OFFICIAL_COCO_NUM_CLASSES:
        return CategoryMap.official_coco()
    return None


@dataclasses.dataclass
class WeightsReport:
    """What :func:`load_weights` did, key by key (model parameter and buffer names)."""
    source: str
    description: str
    loaded: List[str] = dataclasses.field(default_factory=list)          # copied as they are
    mapped: List[str] = dataclasses.field(default_factory=list)          # class rows picked by category
    fresh: List[str] = dataclasses.field(default_factory=list)           # kept at initialisation: no usable rows
    mismatched: List[str] = dataclasses.field(default_factory=list)      # 'key: file (..) vs model (..)'
    missing: List[str] = dataclasses.field(default_factory=list)         # not in the file
    unused: List[str] = dataclasses.field(default_factory=list)          # in the file, not in the model
    matched_by: str = ""                                                 # "name", "id" or "" (rows as they are)
    file_categories: object = None                                      # CategoryMap or None
    categories_without_row: List[str] = dataclasses.field(default_factory=list)  # 'name (id k)'

    def problems_for_inference(self, training_only=()):
        """Lines naming (at most 10 of each) the tensors used at inference that did not load, and the
        categories that have no trained row. ``training_only``: key prefixes the model uses only
        while training (DN's label_enc), which never block."""
        used = lambda key: not key.startswith(tuple(training_only))  # noqa: E731
        problems = []
        for what, keys in (("missing from the file", [k for k in self.missing if used(k)]),
                           ("of another shape in the file", [k for k in self.mismatched if used(k.split(":")[0])]),
                           ("without usable rows in the file", [k for k in self.fresh if used(k)])):
            if keys:
                problems.append(f"{len(keys)} tensor(s) {what}: {short_list(keys)}")
        if self.categories_without_row:
            problems.append(f"{len(self.categories_without_row)} categor{'y' if len(self.categories_without_row) == 1 else 'ies'} "
                            f"with no trained class row (matched by {self.matched_by or 'row'}): "
                            f"{short_list(self.categories_without_row)}")
        return problems


def short_list(values, limit=10):
    """'[a, b, c]' or '[a, ..., j, ... (N in all)]' for long lists in messages."""
    values = list(values)
    if len(values) <= limit:
        return "[" + ", ".join(str(v) for v in values) + "]"
    return "[" + ", ".join(str(v) for v in values[:limit]) + f", ... ({len(values)} in all)]"


def _rows_picked(value, fresh, rows, extra_rows):
    """``fresh`` with row k replaced by ``value[rows[k]]`` where rows[k] is not None, and the last
    ``extra_rows`` rows (the DN label book's "no label" entry) copied from the end of ``value``."""
    picked = fresh.clone()
    for label, row in enumerate(rows):
        if row is not None:
            picked[label] = value[row]
    if extra_rows:
        picked[-extra_rows:] = value[-extra_rows:]
    return picked


def load_weights(model, source, categories=None, prefer_ema=False):
    """Copies the weights of ``source`` (a path, or an already loaded checkpoint object) into
    ``model`` and returns a :class:`WeightsReport`.

    categories: the model's CategoryMap (what its class rows mean). With it, and with a file whose
    rows are known (our stored map, or the official 91-row COCO head), class heads and the DN label
    book are mapped row by row onto the model's categories; rows of categories the file lacks keep
    their initialisation and are listed in ``categories_without_row``. Without it (or without a
    known file map) a class head of the model's shape is copied as it is, another shape is fresh.
    Other tensors are copied when the shapes agree and reported otherwise; nothing raises here:
    the caller decides what is acceptable (training takes fresh rows, evaluation does not).
    """
    path = None if isinstance(source, dict) else os.fspath(source)
    checkpoint = source if path is None else load_file(path)
    state, description = model_state(checkpoint, prefer_ema)
    target = model.state_dict()
    fill_aliases(state, target)
    known = file_categories(checkpoint, state) if categories is not None else None
    rows, matched_by = known.rows_for(categories) if known is not None else (None, "")
    report = WeightsReport(path or "checkpoint", description, matched_by=matched_by, file_categories=known)
    new_state = {}
    for key, wanted in target.items():
        if key not in state:
            report.missing.append(key)
            continue
        value = state[key]
        extra = 1 if _LABEL_BOOK.search(key) else 0
        by_category = (_CLASS_HEAD.search(key) or extra) and rows is not None
        if by_category and value.shape[1:] == wanted.shape[1:] and value.shape[0] == known.num_labels + extra \
                and wanted.shape[0] == len(rows) + extra:
            if any(row is not None for row in rows):
                new_state[key] = _rows_picked(value.to(wanted.dtype), wanted, rows, extra)
                report.mapped.append(key)
            else:
                report.fresh.append(key)
        elif value.shape == wanted.shape:
            new_state[key] = value.to(wanted.dtype)
            report.loaded.append(key)
        elif _CLASS_HEAD.search(key) or extra:
            report.fresh.append(key)
        else:
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(wanted.shape)}")
    report.unused = sorted(set(state) - set(target))
    if categories is not None:
        # Rows that name no category (the official heads' unused ids) score nothing: never missing.
        named = [k for k, category in enumerate(categories.label_to_category_id) if category is not None]
        if any(_CLASS_HEAD.search(key) for key in report.mapped):
            report.categories_without_row = categories.describe([k for k in named if rows[k] is None])
        elif any(_CLASS_HEAD.search(key) for key in report.fresh):
            report.categories_without_row = categories.describe(named)
    model.load_state_dict(new_state, strict=False)
    return report


def describe_report(report, log):
    """Writes a few lines about ``report`` to ``log`` (a print-like function)."""
    log(f"weights from {report.source} ({report.description}): {len(report.loaded)} tensors loaded")
    if report.mapped:
        log(f"  class rows matched by category {report.matched_by} "
            f"({report.file_categories.num_labels} rows in the file): {len(report.mapped)} tensors "
            f"({report.mapped[0]} ...)")
    if report.fresh:
        log(f"  class rows RE-INITIALISED (no category of the file matches): {', '.join(report.fresh)}")
    if report.categories_without_row:
        log(f"  {len(report.categories_without_row)} categories not in the file start from fresh class rows: "
            f"{short_list(report.categories_without_row)}")
    for line in report.mismatched:
        log(f"  NOT loaded, shape mismatch: {line}")
    if report.missing:
        log(f"  NOT in the file (kept at initialisation): {len(report.missing)} tensors, e.g. "
            f"{', '.join(report.missing[:5])}")
    if report.unused:
        log(f"  in the file but not in this model (ignored): {len(report.unused)} tensors, e.g. "
            f"{', '.join(report.unused[:5])}")


def load_for_inference(model, source, categories=None, prefer_ema=True, log=None):
    """:func:`load_weights` for evaluation and inference: raises WeightsMismatch (naming up to 10 of
    each) when a tensor the model uses at inference did not load or a category has no trained class
    row; tensors used only in training (``model.training_only_prefixes``: DN's label_enc) never block."""
    report = load_weights(model, source, categories, prefer_ema=prefer_ema)
    if log is not None:
        describe_report(report, log)
    problems = report.problems_for_inference(getattr(model, "training_only_prefixes", ()))
    if problems:
        raise WeightsMismatch(
            f"{report.source} does not fit this model (the config's architecture and the categories it must "
            "score):\n  " + "\n  ".join(problems)
            + "\nUse the config the weights were trained with (our checkpoints hold it: config.yaml beside them) "
              "and a dataset whose categories the checkpoint has; or fine-tune on this one with tools/train.py "
              "--weights.")
    return report
