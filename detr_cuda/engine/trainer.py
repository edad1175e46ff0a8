"""The training loop, top to bottom: epochs of steps, evaluation, and when checkpoints are written.

``run_training(cfg, resume=None, weights=None, allow_config_change=False)`` is what tools/train.py
calls, once per process (``python`` or ``torchrun``). What the loop runs on (data, model, optimizer,
the restored state of a resumed run) is built by :class:`detr_cuda.engine.setup.RunSetUp`.

One optimizer step is ``train.accumulate_steps`` micro-batches (forward, losses, backward, no
gradient all-reduce but on the last), then clipping, the optimizer, the LR schedule and the EMA.
The step's only host syncs besides Hungarian matching: one, after each micro-batch's forward,
that asks every rank whether its total loss is finite and whether a stop signal arrived; the
logged values stay on the device until a log line needs them.

Checkpoints (all decided in :meth:`Trainer.checkpoint`): ``checkpoint_last.pth`` is written every
``train.checkpoint_every_steps`` optimizer steps, before an end-of-epoch evaluation, at the end of
every ``train.checkpoint_every``-th epoch and of the run, after an evaluation that found a new best
AP (copied to ``checkpoint_best.pth``), and when a stop signal (SIGTERM, Ctrl-C) ends the run.
A non-finite loss never overwrites it: ``checkpoint_last.pth`` keeps the last good state (the
last one written before the failure) and the failing state goes to ``checkpoint_non_finite.pth``.
"""
import contextlib
import math
import os
import time

import torch

from .. import checkpoint as ckpt_io
from .. import config as config_module
from ..util import dist
from ..util.device import autocast_context, move_to_device
from . import resume as resume_policy
from .diagnostics import non_finite_message
from .evaluate import evaluate, scalar_metrics
from .logger import Meter, format_seconds, main_terms, memory_megabytes
from .setup import RunSetUp


class NonFiniteLossError(RuntimeError):
    """More non-finite losses than ``train.max_bad_steps`` allows."""


def weighted_total(loss_dict, weight_dict):
    """sum(loss[k] * weight[k]) over the terms that have a weight."""
    terms = [loss_dict[name] * weight for name, weight in weight_dict.items() if name in loss_dict]
    if not terms:
        raise ValueError(f"criterion returned none of the weighted terms; got {sorted(loss_dict)}, "
                         f"weights for {sorted(weight_dict)}")
    return sum(terms)


class Trainer(RunSetUp):
    """The loop over a run's objects (built by RunSetUp); see the module docstring."""

    def train(self):
        """Runs to the end; returns 0 (finished or stopped cleanly). Raises on errors."""
        train_cfg = self.cfg.train
        started = time.time()
        reason = "epoch_done"
        try:
            while self.state.epoch < train_cfg.epochs:
                epoch = self.state.epoch
                reason, means = self.train_epoch()
                if reason == "stopped":
                    self.log_stopped(self.checkpoint("stop"))
                    return 0
                finished_run = reason == "max_steps" or self.state.epoch >= train_cfg.epochs
                substituted = means.pop("substituted_images")
                record = {"epoch": epoch, "iteration": self.state.step, "finished": reason == "epoch_done",
                          "substituted_images": substituted, **{f"train_{k}": v for k, v in means.items()}}
                is_best = stop_after_evaluation = False
                due = train_cfg.eval_every > 0 and reason == "epoch_done" and self.state.epoch % train_cfg.eval_every == 0
                if self.val_loader is not None and (due or finished_run):
                    # The epoch's training is on disk before a (long) evaluation: a stop, a second
                    # Ctrl-C or a kill during it loses nothing of it.
                    self.checkpoint("evaluation")
                    metrics = self.run_evaluation(epoch)
                    record["test_coco_eval_bbox"] = metrics["coco_stats"]
                    if self.state.best_ap is None or metrics["metrics"]["AP"] > self.state.best_ap:
                        self.state.best_ap, is_best = metrics["metrics"]["AP"], True
                    # A signal during the evaluation: stop after it, not after another step.
                    stop_after_evaluation = not finished_run and self.stop_requested_on_any_rank()
                self.logger.record("epoch", record)
                self.logger.scalars("epoch", {k: v for k, v in record.items() if k.startswith("train_")},
                                    self.state.step)
                self.checkpoint("epoch", epoch=epoch, epoch_finished=reason == "epoch_done", is_best=is_best,
                                final=finished_run or stop_after_evaluation)
                if stop_after_evaluation:
                    self.log_stopped(os.path.join(self.output_dir, ckpt_io.LAST_NAME))
                    return 0
                if finished_run:
                    break
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}. Stopped. {self.save_non_finite()}") from None
        except RuntimeError as error:
            converted = dist.peer_failure(error, f"training step {self.state.step + 1}")
            if converted is None:
                raise
            raise converted from error
        finally:
            self.stop.uninstall()
        self.logger.info(f"training finished at iteration {self.state.step} ({reason}) in "
                         f"{format_seconds(time.time() - started)}; best AP {self.state.best_ap}")
        return 0

    def train_epoch(self):
        """Trains until the epoch ends, ``train.max_steps`` is reached or a stop signal arrives.

        Returns (reason, means): reason "epoch_done", "max_steps" or "stopped"; means of the loss
        terms over this call, averaged over ranks.
        """
        train_cfg = self.cfg.train
        self.train_loader.sampler.set_epoch(self.state.epoch, skip=self.state.batch * train_cfg.batch_size)
        self.ddp_model.train()
        self.criterion.train()
        batches = iter(self.train_loader)
        remaining = len(self.train_loader)
        self.batches_in_epoch = self.state.batch + remaining
        self.epoch_losses, self.interval = Meter(), _Interval()
        self.stop_seen = False
        self.substituted = 0        # images of this epoch that failed to decode (data/coco.py replaced them)
        self.last_end = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        while remaining > 0:
            micro_steps = min(train_cfg.accumulate_steps, remaining)
            consumed = self.train_step(batches, micro_steps)
            remaining -= consumed
            if self.stop_seen:
                return "stopped", self.epoch_means()
            if train_cfg.max_steps > 0 and self.state.step >= train_cfg.max_steps:
                return "max_steps", self.epoch_means()
            if remaining > 0:
                self.checkpoint("step")
        self.state.epoch += 1
        self.state.batch = 0
        return "epoch_done", self.epoch_means()

    def train_step(self, batches, micro_steps):
        """One optimizer step over the next ``micro_steps`` micro-batches; returns how many batches it
        consumed (fewer when a non-finite loss, within ``train.max_bad_steps``, skips the step)."""
        train_cfg = self.cfg.train
        step_start, data_time = self.last_end, 0.0
        for micro_step in range(micro_steps):
            fetch_start = time.perf_counter()
            images, masks, targets = move_to_device(*next(batches), self.device)
            data_time += time.perf_counter() - fetch_start
            self.substituted += sum("substitute_for" in target for target in targets)
            self.state.batch += 1
            last = micro_step == micro_steps - 1
            no_sync = self.ddp_model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with no_sync:
                with autocast_context(self.device, train_cfg.amp):
                    outputs = self.ddp_model(images, masks, targets)
                    loss_dict = self.criterion(outputs, targets)
                    total = weighted_total(loss_dict, self.criterion.weight_dict)
                # Every rank agrees on skipping and stopping: one host sync per micro-batch.
                flags = torch.stack([(~torch.isfinite(total.detach())).float(),
                                     torch.tensor(float(self.stop.requested), device=total.device)])
                bad_ranks, stop_ranks = dist.all_reduce_sum(flags).tolist()
                self.stop_seen = self.stop_seen or stop_ranks > 0
                if bad_ranks > 0:
                    self.skip_non_finite_step(outputs, loss_dict, total, targets, bad_ranks)
                    return micro_step + 1
                scaled = total / train_cfg.accumulate_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            values = {"loss": total, **loss_dict}
            self.interval.losses.add(values)
            self.epoch_losses.add(values)
        self.optimizer_step()
        self.last_end = time.perf_counter()
        self.interval.steps += 1
        self.interval.data_time += data_time
        self.interval.step_time += self.last_end - step_start  # the whole window: data waits + compute
        self.recent_step_times.append(self.last_end - step_start)
        if self.state.step % train_cfg.log_interval == 0:
            self.log_interval()
            self.interval = _Interval()
            self.last_end = time.perf_counter()
        return micro_steps

    def optimizer_step(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.clip_max_norm if self.cfg.train.clip_max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The learning rates this step used (logged), before the schedule moves on.
        self.interval.lrs = {f"lr_{group.get('name', i)}": group["lr"]
                             for i, group in enumerate(self.optimizer.param_groups)}
        self.interval.grad_norms.add({"grad_norm": grad_norm})
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.state.step += 1

    def skip_non_finite_step(self, outputs, loss_dict, total, targets, bad_ranks):
        """Counts a non-finite loss (every rank calls this together) and drops the step's gradients;
        raises NonFiniteLossError beyond ``train.max_bad_steps``."""
        self.state.bad_steps += 1
        message = non_finite_message(self.state, outputs, loss_dict, total, targets, bad_ranks)
        if self.state.bad_steps > self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(message)
        self.logger.info(f"WARNING: {message}; skipping it ({self.state.bad_steps}/{self.cfg.train.max_bad_steps} "
                         "tolerated by train.max_bad_steps)")
        self.optimizer.zero_grad(set_to_none=True)
        self.last_end = time.perf_counter()

    def epoch_means(self):
        """The loss terms' means over the epoch (averaged over ranks) and, summed over ranks,
        ``substituted_images``."""
        means = dist.reduce_dict_mean(self.epoch_losses.mean(), self.device)
        substituted = int(dist.all_reduce_sum(torch.tensor([float(self.substituted)], device=self.device)).item())
        if substituted:
            self.logger.info(f"WARNING: {substituted} image(s) could not be decoded this epoch and were replaced by "
                             "the next readable one (the files are named above, once each)")
        return {**means, "substituted_images": substituted}

    def log_interval(self):
        """One log line: the means since the last one (every rank takes part: a collective)."""
        interval, state = self.interval, self.state
        losses = dist.reduce_dict_mean(interval.losses.mean(), self.device)
        grad_norm = interval.grad_norms.mean().get("grad_norm", float("nan"))
        data_time, step_time = interval.data_time / interval.steps, interval.step_time / interval.steps
        recent = self.recent_step_times
        eta = (sum(recent) / len(recent)) * max(0, self.total_steps - state.step) if recent else float("nan")
        memory = memory_megabytes(self.device)
        scalars = {**losses, **interval.lrs, "grad_norm": grad_norm, "data_time": data_time,
                   "step_time": step_time, "memory_mb": memory}
        self.logger.record("train_interval", {"epoch": state.epoch, "iteration": state.step, "batch": state.batch,
                                              "batches_in_epoch": self.batches_in_epoch, **scalars})
        self.logger.scalars("train", scalars, state.step)
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in main_terms(losses).items())
        lr = interval.lrs.get("lr_main", next(iter(interval.lrs.values())))
        self.logger.info(
            f"epoch {state.epoch} [{state.batch}/{self.batches_in_epoch}] it {state.step}/{self.total_steps} "
            f"eta {format_seconds(eta) if math.isfinite(eta) else '?'} loss {losses.get('loss', float('nan')):.4f} "
            f"({terms}) lr {lr:.2e} grad {grad_norm:.3f} data {data_time:.3f}s step {step_time:.3f}s "
            f"mem {memory:.0f}MB")

    def run_evaluation(self, epoch):
        """COCO evaluation of the EMA weights (or the weights) after ``epoch``; logged and returned."""
        eval_model = self.ema.module if self.ema is not None else self.model
        metrics = evaluate(eval_model, self.postprocessor, self.val_loader, self.val_dataset, self.device,
                           self.cfg, self.output_dir, log=self.logger.info, categories=self.categories)
        headline = scalar_metrics(metrics)
        self.logger.record("eval", {"epoch": epoch, "iteration": self.state.step, "ema": self.ema is not None,
                                    **headline})
        self.logger.scalars("eval", headline, self.state.step)
        return metrics

    def stop_requested_on_any_rank(self):
        """Whether SIGTERM / SIGINT reached any process (every rank must take the same branch)."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        return dist.all_reduce_sum(flag).item() > 0

    def log_stopped(self, path):
        self.logger.info(f"stopped by {self.stop.signal_name or 'a signal to another process'} at iteration "
                         f"{self.state.step}; checkpoint written to {path}; continue with --resume auto")

    # -- checkpoints -------------------------------------------------------------------------------
    def _state_key(self):
        return (self.state.step, self.state.epoch, self.state.batch, self.state.best_ap)

    def checkpoint(self, moment, epoch=None, epoch_finished=False, is_best=False, final=False):
        """Writes checkpoint_last.pth (and copies) when ``moment`` calls for it; the one place that decides.

        moment "step": after an optimizer step inside an epoch, every train.checkpoint_every_steps steps.
        "evaluation": just before an end-of-epoch evaluation. "stop": a stop signal ends the run.
        "epoch": after an epoch's training and its evaluation: when train.checkpoint_every epochs
        have passed, the step count is due, the run ends (``final``), the evaluation found a new best
        (``is_best``: also checkpoint_best.pth), or train.keep_epoch_checkpoints asks for
        checkpoint<epoch>.pth. A state already on disk is not written again (copies aside).
        Collective: every rank calls it. Returns the path of checkpoint_last.pth, or None.
        """
        train_cfg = self.cfg.train
        every_steps = train_cfg.checkpoint_every_steps
        steps_due = every_steps > 0 and self.state.step % every_steps == 0
        copies = []
        if moment == "step":
            due = steps_due
        elif moment in ("evaluation", "stop"):
            due = True
        else:
            copies = ([ckpt_io.BEST_NAME] if is_best else []) + (
                [f"checkpoint{epoch:04d}.pth"] if epoch_finished and train_cfg.keep_epoch_checkpoints else [])
            epoch_due = epoch_finished and self.state.epoch % train_cfg.checkpoint_every == 0
            due = epoch_due or steps_due or final or bool(copies)
        if not due or (self.saved == self._state_key() and not copies):
            return None
        path = self.save(ckpt_io.LAST_NAME, copies)
        if moment == "step":
            self.logger.info(f"checkpoint at iteration {self.state.step} (epoch {self.state.epoch}, batch "
                             f"{self.state.batch}) written to {path}")
        self.last_end = time.perf_counter()  # the write is not data time
        return path

    def save(self, name, extra_copies=()):
        """The current state in ``name`` (and copies) in train.output_dir (collective: every rank
        contributes its random streams; rank 0 writes). Returns the path on rank 0."""
        rng_states = resume_policy.rng_states_of_all_ranks()
        if name == ckpt_io.LAST_NAME:
            self.saved = self._state_key()
        if not self.is_main:
            return None
        checkpoint = {
            "format": ckpt_io.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.state.epoch - 1,           # last finished epoch (the DETR meaning of the key)
            "next_epoch": self.state.epoch,
            "next_batch": self.state.batch,
            "step": self.state.step,
            "bad_steps": self.state.bad_steps,
            "best_ap": self.state.best_ap,
            "rng": rng_states,
            "world_size": self.world_size,
            "config": config_module.config_to_dict(self.cfg),
            "category_map": self.categories.to_dict(),
            "torch_version": str(torch.__version__),
        }
        path = os.path.join(self.output_dir, name)
        ckpt_io.save_atomic(checkpoint, path)
        for copy_name in extra_copies:
            ckpt_io.save_atomic(checkpoint, os.path.join(self.output_dir, copy_name))
        return path

    def save_non_finite(self):
        """Writes the failing state beside checkpoint_last.pth; returns the sentence for the error."""
        bad_path = self.save(ckpt_io.NON_FINITE_NAME)
        last = os.path.join(self.output_dir, ckpt_io.LAST_NAME)
        where = f"The failing state is in {bad_path} (for inspection). " if bad_path else ""
        if self.saved is None:
            return where + "No checkpoint was written before it: start again with a lower train.lr."
        return (where + f"The last good state is {last} (iteration {self.saved[0]}, untouched); an exact resume would fail "
                "the same way, so continue from it with a change, e.g. --resume auto --allow-config-change "
                "train.lr=<lower> (or check the data, or raise train.max_bad_steps to skip such steps).")
class _Interval:
    """Sums for the log line of the steps since the last one."""

    def __init__(self):
        self.losses, self.grad_norms = Meter(), Meter()
        self.lrs = {}
        self.steps, self.data_time, self.step_time = 0, 0.0, 0.0


def run_training(cfg, resume=None, weights=None, allow_config_change=False):
    """Entry point for tools/train.py. Returns the process exit code."""
    trainer = Trainer(cfg, resume=resume, weights=weights, allow_config_change=allow_config_change)
    try:
        code = trainer.train()
        # Every rank is done with the process group (rank 0 may still be writing the last
        # checkpoint) before any tears it down: a gloo peer that leaves early can abort the other.
        dist.barrier()
        return code
    finally:
        trainer.close()
        dist.cleanup()
