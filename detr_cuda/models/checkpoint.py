"""Loading model weights: official Deformable DETR checkpoints and our own.

Official checkpoints are ``torch.save`` dicts with ``model`` (the state dict),
``optimizer``, ``lr_scheduler``, ``epoch`` and ``args`` (a pickled
``argparse.Namespace``). Only ``model`` is used. Loading never runs arbitrary
pickle code unless the caller asks for it with ``trust_pickle=True``.

Class indices of the official COCO checkpoints: 91 logits, logit i scores COCO
category id i (ids 1..90; 0 and the ten ids COCO never uses stay untrained).
The label -> category map for such a checkpoint is therefore the identity on
1..90: ``official_coco_category_map()``.
"""
import argparse
import pickle
from pathlib import Path

import torch

OFFICIAL_COCO_NUM_CLASSES = 91
# Keys left behind by FLOP counters in some released files; never model weights.
_IGNORED_SUFFIXES = ("total_ops", "total_params")
# With box refinement / two-stage the decoder holds the detector's head lists,
# so these prefixes name the same tensors.
_ALIASED_PREFIXES = (("transformer.decoder.bbox_embed.", "bbox_embed."),
                     ("transformer.decoder.class_embed.", "class_embed."))


def official_coco_category_map():
    """Model label -> COCO category id for the official 91-logit checkpoints (identity on 1..90).

    Label 0 has no category; ids COCO does not use (12, 26, 29, 30, 45, 66, 68, 69,
    71, 83) map to themselves and simply never match a ground-truth category.
    """
    return {label: label for label in range(1, OFFICIAL_COCO_NUM_CLASSES)}


def _torch_load(path, trust_pickle):
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first_error:
        # Official checkpoints pickle their argparse.Namespace of arguments: allow exactly that class.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise RuntimeError(
                f"{path}: torch.load(weights_only=True) refused this file because it pickles objects other "
                f"than tensors and argparse.Namespace:\n{first_error}\nIf you trust the file's origin, load it "
                "with trust_pickle=True (runs its pickle code).") from None


def extract_state_dict(checkpoint, source="checkpoint"):
    """The model state dict inside a checkpoint object: its ``model`` entry, or the object itself
    when it already maps names to tensors. ``module.`` prefixes (DDP) are removed."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    if "model" in checkpoint:
        state = checkpoint["model"]
    elif checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise ValueError(f"{source}: no 'model' entry and not a state dict (keys: {sorted(checkpoint)[:10]})")
    if not isinstance(state, dict):
        raise ValueError(f"{source}: 'model' entry is a {type(state).__name__}, not a state dict")
    cleaned = {}
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned


def load_state_dict_file(path, trust_pickle=False):
    """Reads a checkpoint file (official or ours) and returns its model state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return extract_state_dict(_torch_load(path, trust_pickle), str(path))


def load_model_weights(model, checkpoint, strict=True, trust_pickle=False):
    """Loads weights into ``model`` from a path, a checkpoint dict or a state dict.

    Missing keys that have an alias in the file (the duplicated head keys) are
    filled from it. Shape mismatches always raise; with ``strict`` missing or
    unexpected keys raise too, with their names. Returns {"missing": [...], "unexpected": [...]}.
    """
    if isinstance(checkpoint, (str, Path)):
        source = str(checkpoint)
        state = load_state_dict_file(checkpoint, trust_pickle)
    else:
        source = "checkpoint"
        state = extract_state_dict(checkpoint, source)
    expected = model.state_dict()
    for key in expected:
        if key in state:
            continue
        for first, second in _ALIASED_PREFIXES:
            for own, other in ((first, second), (second, first)):
                if key.startswith(own) and other + key[len(own):] in state:
                    state[key] = state[other + key[len(own):]]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:8]))
    if strict and missing:
        problems.append(f"{len(missing)} keys missing from the file: {missing[:10]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the file: {unexpected[:10]}")
    if problems:
        hint = ""
        if any("class_embed" in m for m in mismatched):
            hint = ("\n(class head size differs: official COCO checkpoints have 91 logits; "
                    "set model.num_classes=91 to evaluate them)")
        raise ValueError(f"cannot load {source} into {type(model).__name__}:\n  " + "\n  ".join(problems) + hint)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return {"missing": missing, "unexpected": unexpected}
