"""``--resume``: which checkpoint, whether its run may go on with this config, and restoring it.

A resumed run continues the stored one exactly (weights, optimizer, LR schedule, scaler, EMA,
the position in the epoch, every rank's random streams). The config may change only as
:data:`CHANGEABLE` says:

- fields that do not alter what is trained (:data:`HARMLESS`: epochs, logging, evaluation, output
  folder ...) change freely;
- fields that take effect from the next step (:data:`TAKES_EFFECT`: learning rates and their
  schedule, weight decay, clipping, loss weights, DN noise, augmentation ...) need
  ``--allow-config-change``; learning rates and the schedule are written into the restored
  optimizer and scheduler, so the new values are the ones trained with;
- every other field (the model, the training data, batch size, accumulation, seed, EMA on/off)
  cannot change mid-run: such a resume is refused, also with ``--allow-config-change``; start a
  new run from the weights instead (``--weights``).
"""
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from .. import config as config_module
from ..util import dist

HARMLESS = ("train.epochs", "train.max_steps", "train.log_interval", "train.eval_every", "train.checkpoint_every",
            "train.checkpoint_every_steps", "train.keep_epoch_checkpoints", "train.output_dir",
            "train.dist_timeout_s", "data.num_workers", "data.check_images", "data.cache_images", "data.val_", "eval.")
TAKES_EFFECT = ("train.lr", "train.lr_backbone", "train.lr_linear_proj_mult", "train.weight_decay",
                "train.clip_max_norm", "train.lr_drop", "train.lr_drop_gamma", "train.warmup_steps", "train.amp",
                "train.ema_decay", "train.max_bad_steps", "train.deterministic", "train.device", "loss.",
                "dn.label_noise_ratio", "dn.box_noise_scale", "dn.dn_groups", "dn.max_dn_queries", "dn.contrastive",
                "data.train_short_sides", "data.train_max_size", "data.crop_resize_sides", "data.crop_min_size",
                "data.crop_max_size", "data.random_crop", "data.horizontal_flip", "data.invalid_annotations",
                "model.msda_backend", "model.ffn_recompute")


@dataclass
class TrainState:
    """Where a run stands; stored in checkpoints."""
    epoch: int = 0                  # epoch in progress (or next to start)
    batch: int = 0                  # batches of ``epoch`` this rank has consumed (at a step boundary)
    step: int = 0                   # optimizer steps taken
    bad_steps: int = 0              # non-finite losses skipped so far
    best_ap: Optional[float] = None


class ResumeConfigMismatch(ValueError):
    """``--resume`` with a config that differs from the checkpoint's in fields that matter."""


def _flatten(values, prefix=""):
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(field, names):
    return any(field == name or (name.endswith((".", "_")) and field.startswith(name)) for name in names)


def config_changes(saved, current):
    """(harmless, effective, fixed): lists of 'field: saved -> current' for the fields that differ
    between two config dicts, sorted into the three kinds of the module docstring."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    harmless, effective, fixed = [], [], []
    for field in sorted(set(saved_flat) | set(current_flat)):
        before, after = saved_flat.get(field), current_flat.get(field)
        if before == after:
            continue
        line = f"{field}: {before!r} -> {after!r}"
        kind = harmless if _matches(field, HARMLESS) else effective if _matches(field, TAKES_EFFECT) else fixed
        kind.append(line)
    return harmless, effective, fixed


def comparable(values):
    """A config dict as a resume compares it: every field present (defaults for fields added since
    the run started) and, for data.dataset "coco", the data sets as the absolute paths they name
    (``data.train_sources``, ``data.val_sources``: [[images, annotations], ...]) instead of
    data.root and the four path fields, so naming the same files another way (data.root, or
    relative paths, which runs made before paths were resolved took from the current folder) is
    no change."""
    from ..data.build import configured_paths
    config = config_module.config_from_dict(values)
    flat = config_module.config_to_dict(config)
    if config.data.dataset != "coco":
        return flat
    for split in ("train", "val"):
        try:
            columns = configured_paths(config.data, split)
        except ValueError:  # the split is not configured: compared as the fields are
            continue
        images, annotations = ([os.path.abspath(p) for p in (value if isinstance(value, list) else [value])]
                               for _, value in columns.values())
        flat["data"][f"{split}_sources"] = [list(pair) for pair in zip(images, annotations)]
        del flat["data"][f"{split}_images"], flat["data"][f"{split}_annotations"]
    flat["data"]["root"] = None
    return flat


def check_config_change(saved, current, path, allow_config_change):
    """Raises ResumeConfigMismatch for a change the resumed run cannot take; returns the lines of
    the changes that take effect (to be printed). ``saved``, ``current``: config dicts (compared in
    their :func:`comparable` form)."""
    _, effective, fixed = config_changes(comparable(saved), comparable(current))
    if fixed:
        raise ResumeConfigMismatch(
            f"--resume {path}: these fields cannot change in the middle of a run:\n  " + "\n  ".join(fixed)
            + "\nResume with the run's values (its config is config.yaml in its output folder), or start a new run "
              "from its weights with --weights " + str(path) + ".")
    if effective and not allow_config_change:
        raise ResumeConfigMismatch(
            f"--resume {path}: the config differs from the one the run was started with:\n  " + "\n  ".join(effective)
            + "\nResume with the same config (the checkpoint's is in its output folder as config.yaml), or pass "
              "--allow-config-change to continue with the new values (they take effect from the next step).")
    return effective


def resolve_resume_path(resume, output_dir, log):
    """The checkpoint to resume from: None (no --resume, or "auto" without a checkpoint), else a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = os.path.join(output_dir, ckpt_io.LAST_NAME)
        if os.path.isfile(found):
            return found
        log(f"--resume auto: no {ckpt_io.LAST_NAME} in {output_dir}; starting a new run")
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such file")
    return resume


def load_training_checkpoint(path):
    checkpoint = ckpt_io.load_file(path)
    if not ckpt_io.is_training_checkpoint(checkpoint):
        raise ckpt_io.CheckpointError(
            f"{path} is not a detr_cuda training checkpoint (no format={ckpt_io.FORMAT!r}); --resume continues one "
            "of our runs exactly. To start from other weights (e.g. an official Deformable DETR file) use --weights.")
    return checkpoint


def check_output_folder(resume_path, output_dir, log):
    """Refuses to resume into a folder whose checkpoint_last.pth is not the one being resumed: the
    continued run writes to ``output_dir``, which must not hold another run's checkpoint."""
    own = os.path.join(output_dir, ckpt_io.LAST_NAME)
    if os.path.realpath(os.path.dirname(os.path.abspath(resume_path))) == os.path.realpath(output_dir):
        return
    if os.path.exists(own) and not os.path.samefile(own, resume_path):
        raise FileExistsError(
            f"--resume {resume_path}: train.output_dir {output_dir} holds another {ckpt_io.LAST_NAME}, "
            f"which the resumed run would overwrite. Resume with train.output_dir="
            f"{os.path.dirname(os.path.abspath(resume_path))} (the checkpoint's folder; the default for "
            "--resume PATH without --config) or a new folder.")
    log(f"--resume {resume_path}: the run continues in train.output_dir {output_dir}, not in the checkpoint's folder")


# -- random streams ---------------------------------------------------------------------------------
def capture_rng_state():
    """This process's random streams as weights_only-loadable values."""
    version, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [version, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state):
    version, keys, position, has_gauss, cached_gaussian = state["numpy"]
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np.random.set_state((version, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def apply_learning_rates(optimizer, lr_scheduler, train_cfg):
    """After a restore: the config's base learning rates, weight decay and LR schedule replace the
    stored ones (same parameter groups by name), and each group's current lr follows from them at
    the stored step, so a changed train.lr is the one trained with."""
    from .optim import group_base_lrs
    base_lrs = group_base_lrs(optimizer, train_cfg)
    rule = lr_scheduler.lr_lambdas[0]
    rule.lr_drop, rule.gamma, rule.warmup_steps = train_cfg.lr_drop, train_cfg.lr_drop_gamma, train_cfg.warmup_steps
    lr_scheduler.base_lrs = base_lrs
    factor = rule(lr_scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * factor
        group["weight_decay"] = train_cfg.weight_decay
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def world_size_change_message(path, saved_world_size, world_size, state, batch_size, accumulate_steps,
                              saved_steps_per_epoch, steps_per_epoch, lr_drop):
    """The WARNING of a resume with another number of processes: what changes, line by line.

    ``state`` is the restored TrainState (``state.batch`` = batches each old rank consumed in
    ``state.epoch``); ``saved_steps_per_epoch`` is the LR schedule's stored value (None if unknown).
    """
    accumulate = max(1, accumulate_steps)
    lines = [f"WARNING: {path} was written by {saved_world_size} processes, this run has {world_size}:",
             "  - random streams are re-seeded: the continuation is not bit-identical to an uninterrupted run"]
    if saved_world_size:
        lines.append(f"  - images per optimizer step: {batch_size * saved_world_size * accumulate} -> "
                     f"{batch_size * world_size * accumulate} (train.batch_size {batch_size} x processes x "
                     f"accumulate {accumulate}); the learning rate is not rescaled")
        per_rank = state.batch * batch_size  # samples each rank had taken from this epoch's order
        trained, restart = saved_world_size * per_rank, world_size * per_rank
        if restart < trained:
            lines.append(f"  - epoch {state.epoch}: images 0..{trained - 1} of its order were trained on; this run "
                         f"continues after image {restart - 1 if restart else 'none'}, so the {trained - restart} "
                         "images between are trained on twice this epoch")
        elif restart > trained:
            lines.append(f"  - epoch {state.epoch}: images 0..{trained - 1 if trained else 'none'} of its order were "
                         f"trained on; this run continues after image {restart - 1}, so images {trained}.."
                         f"{restart - 1} ({restart - trained}) are skipped this epoch")
    if saved_steps_per_epoch is not None and saved_steps_per_epoch != steps_per_epoch:
        text = (f"  - the LR schedule keeps the stored {saved_steps_per_epoch} steps per epoch (this run has "
                f"{steps_per_epoch})")
        if lr_drop > 0:
            period = lr_drop * saved_steps_per_epoch
            next_drop = (state.step // period + 1) * period  # first 0-based optimizer step with the lower lr
            epoch_of_drop = state.epoch + (next_drop - state.step + state.batch // accumulate) // max(1, steps_per_epoch)
            text += (f": the next drop (train.lr_drop={lr_drop} epochs) comes at iteration {next_drop + 1}, "
                     f"in epoch {epoch_of_drop} of this run (epoch {next_drop // saved_steps_per_epoch} at the "
                     "stored rate)")
        lines.append(text)
    return "\n".join(lines)


def rng_states_of_all_ranks():
    """Every rank's random streams, gathered (a collective: every rank calls it)."""
    return dist.all_gather_object(capture_rng_state())
