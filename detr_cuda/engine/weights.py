"""``--weights``: initialise a model from our checkpoints or the official Deformable DETR files.

Only the model weights are read (never optimizer, schedule or epoch: that is
``--resume``). Class heads are matched by COCO category id, never by raw row:
  * our checkpoints index their heads by contiguous label 0..K-1 and store the
    label -> category id map (``category_map``): row k of the model gets the
    file's row of the same category id (categories the file lacks keep their
    fresh initialisation), also when both heads happen to have K rows;
  * the official 91-way COCO head is indexed by category id itself and is
    sliced onto the dataset's category ids;
  * otherwise a head of another size is left at its fresh initialisation.
The user is told which, together with every other key that was not loaded.
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


def stored_category_ids(checkpoint):
    """Category id of each label row of one of our checkpoints (its ``category_map``), or None.

    The trainer stores ``{"label_to_category_id": [...], "class_names": [...]}``;
    ``{"ids": [...], "names": [...]}`` is accepted as the short spelling.
    """
    stored = checkpoint.get("category_map") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        return None
    ids = stored.get("label_to_category_id") or stored.get("ids")
    return [int(i) for i in ids] if ids else None


def short_list(values, limit=10):
    """'[a, b, c]' or '[a, ..., j, ... (N in all)]' for long lists in messages."""
    values = list(values)
    if len(values) <= limit:
        return str(values)
    return "[" + ", ".join(str(v) for v in values[:limit]) + f", ... ({len(values)} in all)]"


def _rows_by_category(file_ids, model_ids):
    """For each model label the file row with the same category id (None where the file lacks it)."""
    row_of = {category: row for row, category in enumerate(file_ids)}
    return [row_of.get(category) for category in model_ids]


def _pick_rows(value, fresh, rows, extra_last_row=False):
    """``fresh`` with row k replaced by ``value[rows[k]]`` where rows[k] is not None.

    extra_last_row: the tensors carry one more row after the labels (the DN
    label book's "no label" entry), copied as is.
    """
    picked = fresh.clone()
    for label, row in enumerate(rows):
        if row is not None:
            picked[label] = value[row]
    if extra_last_row:
        picked[-1] = value[-1]
    return picked


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

    category_ids: category id of each contiguous label of the current dataset.
    With it, the class heads (and the DN label book) of one of our checkpoints
    are mapped through the file's ``category_map`` so that every row keeps its
    category id, and a class head with more rows than labels (the official
    91-way COCO head, indexed by category id) is sliced onto this dataset.
    Report keys: loaded, mapped, reinitialised, mismatched, missing, unused
    (lists of parameter names), file_category_ids (the file's map or None),
    categories_not_in_file (this dataset's category ids the file has no row
    for; only known for our checkpoints), file_num_classes (rows of the file's
    class head or None).
    """
    checkpoint = ckpt_io.load_file(path)
    source, description = extract_state_dict(checkpoint, prefer_ema)
    file_ids = stored_category_ids(checkpoint)
    rows = _rows_by_category(file_ids, category_ids) if file_ids is not None and category_ids is not None else None
    source = _clean(source)
    target = model.state_dict()
    _fill_aliases(source, target)
    loaded, mapped, reinitialised, mismatched = [], [], [], []
    new_state = {}
    for key, value in source.items():
        if key not in target:
            continue
        wanted = target[key]
        by_label = rows is not None and value.shape[1:] == wanted.shape[1:] and (
            (_CLASS_HEAD.search(key) and value.shape[0] == len(file_ids) and wanted.shape[0] == len(rows))
            or (_LABEL_BOOK.search(key) and value.shape[0] == len(file_ids) + 1 and wanted.shape[0] == len(rows) + 1))
        if by_label:  # our label-indexed head: through the file's category map
            if any(row is not None for row in rows):
                new_state[key] = _pick_rows(value.to(wanted.dtype), wanted, rows,
                                            extra_last_row=bool(_LABEL_BOOK.search(key)))
                mapped.append(key)
            else:
                reinitialised.append((key, tuple(value.shape), tuple(wanted.shape)))
        elif value.shape == wanted.shape:
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
    absent = [c for c, row in zip(category_ids, rows) if row is None] if rows is not None else []
    if mapped and rows is not None:
        log(f"  class heads mapped through the file's category map ({len(file_ids)} categories) onto this "
            f"dataset's {len(category_ids)} classes by category id: {len(mapped)} tensors ({mapped[0]} ...)")
        if absent:
            log(f"  {len(absent)} categories not in the file (their class rows keep the fresh initialisation): "
                f"{short_list(absent)}")
    elif mapped:
        log(f"  class heads mapped by category id onto this dataset's {len(category_ids)} classes: "
            f"{len(mapped)} tensors ({mapped[0]} ...)")
    if reinitialised and rows is not None and not any(row is not None for row in rows):
        log(f"  class heads RE-INITIALISED (the file's categories {file_ids} and this dataset's {category_ids} "
            "have none in common): " + ", ".join(k for k, _, _ in reinitialised))
    elif reinitialised:
        log(f"  class heads RE-INITIALISED (the file has a different number of classes, "
            f"{reinitialised[0][1][0]} vs {reinitialised[0][2][0]}): " + ", ".join(k for k, _, _ in reinitialised))
    for key, have, want in mismatched:
        log(f"  NOT loaded, shape mismatch: {key} file {have} model {want}")
    if missing:
        log(f"  NOT in the file (kept at initialisation): {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    if unused:
        log(f"  in the file but not in this model (ignored): {len(unused)} tensors, e.g. {', '.join(unused[:5])}")
    return {"loaded": loaded, "mapped": mapped, "reinitialised": [k for k, _, _ in reinitialised],
            "mismatched": [k for k, _, _ in mismatched], "missing": missing, "unused": unused,
            "file_category_ids": file_ids, "categories_not_in_file": absent,
            "file_num_classes": _file_num_classes(source)}


def _file_num_classes(source):
    """Rows of the file's class head (None when it has none)."""
    for key, value in source.items():
        if _CLASS_HEAD.search(key) or key.endswith("class_embed.weight"):
            return int(value.shape[0])
    return None
