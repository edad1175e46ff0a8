"""One training epoch: loss weighting, accumulation, autocast, clipping, logging, stop handling."""
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed
from .logger import format_seconds, memory_megabytes


class NonFiniteLossError(RuntimeError):
    """More non-finite losses than ``train.max_bad_steps`` allows."""


@dataclass
class TrainState:
    """Where a run stands; stored in checkpoints."""
    epoch: int = 0                  # epoch in progress (or next to start)
    batch: int = 0                  # batches of ``epoch`` this rank has consumed (always at a step boundary)
    step: int = 0                   # optimizer steps taken
    bad_steps: int = 0              # non-finite losses skipped so far
    best_ap: Optional[float] = None


def autocast_context(device, amp):
    """Autocast for ``train.amp`` in {"none", "bf16", "fp16"}."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"train.amp must be none, bf16 or fp16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


def weighted_total(loss_dict, weight_dict):
    """sum(loss[k] * weight[k]) over the terms that have a weight."""
    terms = [loss_dict[name] * weight for name, weight in weight_dict.items() if name in loss_dict]
    if not terms:
        raise ValueError(f"criterion returned none of the weighted terms; got {sorted(loss_dict)}, "
                         f"weights for {sorted(weight_dict)}")
    return sum(terms)


def move_to_device(images, masks, targets, device):
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    masks = masks.to(device, non_blocking=non_blocking)
    targets = [{key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
                for key, value in target.items()} for target in targets]
    return images, masks, targets


def _main_terms(values):
    """Loss terms of the last decoder layer (no _0.._N / _enc suffix) for the console line."""
    return {k: v for k, v in values.items()
            if k.startswith("loss_") and not k.rsplit("_", 1)[-1].isdigit() and not k.endswith("_enc")}


class _Meter:
    """Running sums of scalar values over an interval."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, values):
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def mean(self):
        return {key: value / max(1, self.count) for key, value in self.sums.items()}


def train_one_epoch(model, criterion, loader, optimizer, lr_scheduler, scaler, ema, state, train_cfg, device,
                    logger, stop, total_steps, unwrapped_model, save_checkpoint=None):
    """Trains until the epoch ends, ``train.max_steps`` is reached or a stop signal arrives.

    Returns (reason, epoch_means): reason is "epoch_done", "max_steps" or "stopped";
    epoch_means are the rank-averaged means of the loss terms over this call.
    ``save_checkpoint()`` (collective, every rank calls it) is called after every
    ``train.checkpoint_every_steps``-th optimizer step inside the epoch; the step that
    ends the epoch or the call is left to the caller, which checkpoints there anyway.
    Raises NonFiniteLossError (state still describes the last good step).
    """
    model.train()
    criterion.train()
    accumulate = max(1, train_cfg.accumulate_steps)
    batches_in_epoch = state.batch + len(loader)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    params = [p for p in model.parameters() if p.requires_grad]
    interval, epoch_meter = _Meter(), _Meter()
    batch_index, window, stop_seen = state.batch, 0, False
    step_times = []
    last_end = time.perf_counter()
    window_data_time = 0.0
    optimizer.zero_grad(set_to_none=True)
    for images, masks, targets in loader:
        if window == 0:
            window_start = last_end
        data_time = time.perf_counter() - last_end
        window_data_time += data_time
        images, masks, targets = move_to_device(images, masks, targets, device)
        last_micro = window + 1 == accumulate or batch_index + 1 == batches_in_epoch
        sync = model.no_sync() if is_ddp and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast_context(device, train_cfg.amp):
                outputs = model(images, masks, targets)
                bad_outputs = non_finite_outputs(outputs)
                # Every rank agrees on skipping and stopping (the criterion holds a collective too).
                flags = torch.tensor([1.0 if bad_outputs else 0.0, 1.0 if stop.requested else 0.0], device=device)
                distributed.all_reduce_sum(flags)
                stop_seen = stop_seen or flags[1].item() > 0
                loss_dict, total = {}, None
                if flags[0].item() == 0:
                    loss_dict = criterion(outputs, targets)
                    total = weighted_total(loss_dict, criterion.weight_dict)
                    loss_flag = torch.tensor([0.0 if torch.isfinite(total.detach()).item() else 1.0], device=device)
                    distributed.all_reduce_sum(loss_flag)
                    ranks_bad = loss_flag.item()
                else:
                    ranks_bad = flags[0].item()
            if ranks_bad > 0:
                state.bad_steps += 1
                message = _non_finite_message(state, batch_index, loss_dict, total, bad_outputs, targets, ranks_bad)
                if state.bad_steps > train_cfg.max_bad_steps:
                    raise NonFiniteLossError(message)
                logger.info(f"WARNING: {message}; skipping it ({state.bad_steps}/{train_cfg.max_bad_steps} "
                            "tolerated by train.max_bad_steps)")
                optimizer.zero_grad(set_to_none=True)
                batch_index += 1
                state.batch, window, window_data_time = batch_index, 0, 0.0
                last_end = time.perf_counter()
                continue
            scaled = total / accumulate
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        values = {name: value for name, value in zip(
            ["loss"] + list(loss_dict), torch.stack([total.detach().float()] + [
                v.detach().float() for v in loss_dict.values()]).tolist())}
        interval.add(values)
        epoch_meter.add(values)
        batch_index += 1
        window += 1
        if window < accumulate and batch_index < batches_in_epoch:
            last_end = time.perf_counter()
            continue

        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = train_cfg.clip_max_norm if train_cfg.clip_max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The learning rates this step used (logged), before the schedule moves on.
        interval.lrs = {f"lr_{group.get('name', i)}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
        lr_scheduler.step()
        if ema is not None:
            ema.update(unwrapped_model)
        state.step += 1
        state.batch = batch_index
        window = 0
        now = time.perf_counter()
        step_times.append(now - window_start)  # whole window: data waits + compute
        _record_step_timing(interval, grad_norm, window_data_time, step_times[-1])
        window_data_time = 0.0

        if state.step % max(1, train_cfg.log_interval) == 0:
            _log_interval(interval, state, batches_in_epoch, accumulate, optimizer, step_times, total_steps,
                          device, logger)
            interval = _Meter()
        last_end = time.perf_counter()
        if stop_seen:
            return "stopped", distributed.reduce_dict_mean(epoch_meter.mean(), device)
        if train_cfg.max_steps > 0 and state.step >= train_cfg.max_steps:
            return "max_steps", distributed.reduce_dict_mean(epoch_meter.mean(), device)
        if (save_checkpoint is not None and batch_index < batches_in_epoch
                and step_checkpoint_due(state.step, train_cfg.checkpoint_every_steps)):
            save_checkpoint()
            last_end = time.perf_counter()  # the write is not data time
    return "epoch_done", distributed.reduce_dict_mean(epoch_meter.mean(), device)


def step_checkpoint_due(step, every_steps):
    """True when ``train.checkpoint_every_steps`` (0 = off) asks for a checkpoint after ``step``."""
    return every_steps > 0 and step % every_steps == 0


def _record_step_timing(meter, grad_norm, data_time, step_time):
    meter.sums["grad_norm"] = meter.sums.get("grad_norm", 0.0) + grad_norm
    meter.sums["data_time"] = meter.sums.get("data_time", 0.0) + data_time
    meter.sums["step_time"] = meter.sums.get("step_time", 0.0) + step_time
    meter.steps = getattr(meter, "steps", 0) + 1


def _log_interval(meter, state, batches_in_epoch, accumulate, optimizer, step_times, total_steps, device, logger):
    steps = max(1, getattr(meter, "steps", 1))
    losses = {k: v / max(1, meter.count) for k, v in meter.sums.items()
              if k not in ("grad_norm", "data_time", "step_time")}
    losses = distributed.reduce_dict_mean(losses, device)  # collective: every rank logs at the same steps
    grad_norm = meter.sums.get("grad_norm", 0.0) / steps
    data_time = meter.sums.get("data_time", 0.0) / steps
    step_time = meter.sums.get("step_time", 0.0) / steps
    recent = step_times[-50:]
    eta = (sum(recent) / len(recent)) * max(0, total_steps - state.step) if recent else float("nan")
    lrs = meter.lrs
    memory = memory_megabytes(device)
    record = {"epoch": state.epoch, "iteration": state.step, "batch": state.batch,
              "batches_in_epoch": batches_in_epoch, **losses, **lrs, "grad_norm": grad_norm,
              "data_time": data_time, "step_time": step_time, "memory_mb": memory}
    logger.record("train_interval", record)
    logger.scalars("train", {**losses, **lrs, "grad_norm": grad_norm, "data_time": data_time,
                             "step_time": step_time, "memory_mb": memory}, state.step)
    terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in _main_terms(losses).items())
    logger.info(f"epoch {state.epoch} [{state.batch}/{batches_in_epoch}] it {state.step}/{total_steps} "
                f"eta {format_seconds(eta) if math.isfinite(eta) else '?'} loss {losses.get('loss', float('nan')):.4f} "
                f"({terms}) lr {lrs.get('lr_main', next(iter(lrs.values()))):.2e} grad {grad_norm:.3f} "
                f"data {data_time:.3f}s step {step_time:.3f}s mem {memory:.0f}MB")


def non_finite_outputs(outputs, prefix=""):
    """Names of the model output tensors that hold NaN or inf (checked before the matcher sees them)."""
    names = []
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            names += non_finite_outputs(value, f"{prefix}{key}." if prefix or key else "")
    elif isinstance(outputs, (list, tuple)):
        for index, value in enumerate(outputs):
            names += non_finite_outputs(value, f"{prefix}{index}.")
    elif torch.is_tensor(outputs) and outputs.is_floating_point() and not torch.isfinite(outputs.detach()).all():
        names.append(prefix.rstrip("."))
    return names


def _non_finite_message(state, batch_index, loss_dict, total, bad_outputs, targets, ranks_bad):
    where = (f"non-finite loss at iteration {state.step + 1} (epoch {state.epoch}, batch {batch_index}) on "
             f"{int(ranks_bad)} rank(s)")
    image_ids = [int(t["image_id"]) for t in targets if "image_id" in t]
    if bad_outputs:
        detail = f"the model's outputs are already non-finite on rank {distributed.get_rank()}: " + ", ".join(
            bad_outputs[:6]) + (" ..." if len(bad_outputs) > 6 else "")
    elif total is None:
        detail = "another rank's model outputs are non-finite"
    else:
        terms = ", ".join(f"{name}={value.item():.4g}" for name, value in loss_dict.items()
                          if not torch.isfinite(value.detach()).all()) or "all terms finite on this rank"
        detail = f"total {total.item():.4g}; non-finite loss terms on rank {distributed.get_rank()}: {terms}"
    return f"{where}: {detail}; image ids {image_ids}"
