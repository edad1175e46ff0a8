"""``--weights``: initialise a model from our checkpoints or the official Deformable DETR files.

Only the model weights are read (never optimizer, schedule or epoch: that is
``--resume``). Class heads whose number of classes differs from the model's
are either mapped by category id (an official 91-way COCO head onto a dataset
whose category ids index it) or left at their fresh initialisation; the user
is told which, together with every other key that was not loaded.
"""
import re

import torch

from . import checkpoint as ckpt_io

_IGNORED_SUFFIXES = ("total_ops", "total_params")  # left in some official files by a FLOP profiler
_CLASS_HEAD = re.compile(r"(^|\.)class_embed\.\d+\.(weight|bias)$")
_LABEL_BOOK = re.compile(r"(^|\.)label_enc\.weight$")


def extract_state_dict(checkpoint, prefer_ema=False):
    """(state_dict, description) from any checkpoint layout we know."""
    if isinstance(checkpoint, dict) and checkpoint.get("format") == ckpt_io.FORMAT:
        if prefer_ema and checkpoint.get("ema") is not None:
            return checkpoint["ema"]["module"], "detr_cuda checkpoint (EMA weights)"
        return checkpoint["model"], "detr_cuda checkpoint"
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"], "DETR-style checkpoint ('model' entry)"
    if isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint, "plain state_dict"
    raise ValueError("unrecognised checkpoint layout: expected a dict with a 'model' state_dict or a state_dict")


# With box refinement / two-stage the decoder holds the detector's head lists: both names are the same tensors,
# and a file may carry only one of them.
_ALIASES = (("transformer.decoder.bbox_embed.", "bbox_embed."), ("transformer.decoder.class_embed.", "class_embed."))


def _fill_aliases(source, target_keys):
    for key in target_keys:
        if key in source:
            continue
        for first, second in _ALIASES:
            for own, other in ((first, second), (second, first)):
                if key.startswith(own) and other + key[len(own):] in source:
                    source[key] = source[other + key[len(own):]]


def _clean(state_dict):
    cleaned = {}
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned


def load_weights(model, path, category_ids=None, prefer_ema=False, log=print):
    """Copies matching weights from ``path`` into ``model``; returns a report dict.

    category_ids: category id of each contiguous label of the current dataset;
    lets a class head with more rows (e.g. the official 91-way COCO head,
    indexed by category id) be sliced onto this dataset's labels.
    """
    source, description = extract_state_dict(ckpt_io.load_file(path), prefer_ema)
    source = _clean(source)
    target = model.state_dict()
    _fill_aliases(source, target)
    loaded, mapped, reinitialised, mismatched = [], [], [], []
    new_state = {}
    for key, value in source.items():
        if key not in target:
            continue
        wanted = target[key]
        if value.shape == wanted.shape:
            new_state[key] = value.to(wanted.dtype)
            loaded.append(key)
        elif _CLASS_HEAD.search(key) and value.shape[1:] == wanted.shape[1:]:
            if category_ids is not None and len(category_ids) == wanted.shape[0] \
                    and max(category_ids) < value.shape[0]:
                new_state[key] = value[torch.as_tensor(category_ids)].to(wanted.dtype)
                mapped.append(key)
            else:
                reinitialised.append((key, tuple(value.shape), tuple(wanted.shape)))
        elif _LABEL_BOOK.search(key):
            reinitialised.append((key, tuple(value.shape), tuple(wanted.shape)))
        else:
            mismatched.append((key, tuple(value.shape), tuple(wanted.shape)))
    model.load_state_dict(new_state, strict=False)
    missing = sorted(set(target) - set(new_state) - {k for k, _, _ in reinitialised + mismatched})
    unused = sorted(set(source) - set(target))
    log(f"weights from {path} ({description}): {len(loaded)} tensors loaded")
    if mapped:
        log(f"  class heads mapped by category id onto this dataset's {len(category_ids)} classes: "
            f"{len(mapped)} tensors ({mapped[0]} ...)")
    if reinitialised:
        log(f"  class heads RE-INITIALISED (the file has a different number of classes, "
            f"{reinitialised[0][1][0]} vs {reinitialised[0][2][0]}): " + ", ".join(k for k, _, _ in reinitialised))
    for key, have, want in mismatched:
        log(f"  NOT loaded, shape mismatch: {key} file {have} model {want}")
    if missing:
        log(f"  NOT in the file (kept at initialisation): {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    if unused:
        log(f"  in the file but not in this model (ignored): {len(unused)} tensors, e.g. {', '.join(unused[:5])}")
    return {"loaded": loaded, "mapped": mapped, "reinitialised": [k for k, _, _ in reinitialised],
            "mismatched": [k for k, _, _ in mismatched], "missing": missing, "unused": unused}
