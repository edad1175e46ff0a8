"""The training run: config -> data, model, optimizer -> epochs with evaluation and checkpoints.

``run_training(cfg, resume=None, weights=None)`` is what ``tools/train.py``
calls, once per process (``python`` or ``torchrun``). It reads top to bottom:
set-up, resume or initialise, the epoch loop, and the three ways a run ends
(finished / max_steps, a stop signal, a non-finite loss).
"""
import dataclasses
import os
import random
import time

import numpy as np
import torch

from .. import config as config_module
from . import checkpoint as ckpt_io
from . import distributed
from .ema import ModelEMA
from .evaluate import evaluate, scalar_metrics
from .logger import RunLogger, format_seconds
from .optim import build_lr_scheduler, build_optimizer
from .signals import StopRequest, shield_loader_workers, shutdown_loader_workers
from .train_loop import NonFiniteLossError, TrainState, step_checkpoint_due, train_one_epoch
from .weights import load_weights

# Fields a resumed run may change without --allow-config-change: they do not alter what is being trained.
RESUME_MUTABLE_FIELDS = ("train.epochs", "train.max_steps", "train.log_interval", "train.eval_every",
                         "train.checkpoint_every", "train.checkpoint_every_steps", "train.keep_epoch_checkpoints",
                         "train.output_dir", "train.dist_timeout_s", "data.num_workers", "eval.batch_size",
                         "eval.num_select", "eval.score_threshold")


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


def config_differences(saved, current):
    """['field: saved -> current', ...] over fields that are not in RESUME_MUTABLE_FIELDS."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    return [f"{key}: {saved_flat.get(key)!r} -> {current_flat.get(key)!r}"
            for key in sorted(set(saved_flat) | set(current_flat))
            if key not in RESUME_MUTABLE_FIELDS and saved_flat.get(key) != current_flat.get(key)]


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def describe_environment(device):
    """What a bug report needs: versions, device, the git commit of this checkout."""
    import subprocess
    info = {"torch": str(torch.__version__), "cuda": str(torch.version.cuda), "device": str(device),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                     text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git"] = "unknown"
    return info


RANDOM_FROZEN_BACKBONE_WARNING = (
    "WARNING: model.backbone_weights is not set, so the ResNet starts from random weights, and "
    "model.freeze_stem_and_layer1=true (or train_backbone=false) keeps part of it frozen at them. "
    "The published recipes start "
    "from ImageNet weights: pass model.backbone_weights=PATH (torchvision's resnet50-19c8e357.pth for the "
    "paper's numbers), or --weights PATH, or set model.freeze_stem_and_layer1=false to train from scratch.")


def random_backbone_frozen_in_part(model_cfg):
    """True when training would keep randomly initialised backbone layers frozen (no ImageNet weights given)."""
    return not model_cfg.backbone_weights and (model_cfg.freeze_stem_and_layer1 or not model_cfg.train_backbone)


def build_datasets(cfg, log):
    """(train_dataset, val_dataset or None) through the data package."""
    from ..data import build_dataset
    train_dataset = build_dataset(cfg, "train")
    log(train_dataset.summary())
    val_dataset = None
    no_val_paths = cfg.data.dataset == "coco" and not cfg.data.val_images and not cfg.data.val_annotations
    if cfg.train.eval_every < 0:
        log("train.eval_every=-1: no evaluation in this run")
    elif no_val_paths:
        log("no validation set (data.val_images / data.val_annotations unset): no evaluation in this run")
    else:
        val_dataset = build_dataset(cfg, "val")
        log(val_dataset.summary())
    return train_dataset, val_dataset


def _make_checkpoint(model, optimizer, lr_scheduler, scaler, ema, state, cfg, category_map, rng_states):
    return {
        "format": ckpt_io.FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": state.epoch - 1,           # last finished epoch (the DETR meaning of the key)
        "next_epoch": state.epoch,
        "next_batch": state.batch,
        "step": state.step,
        "bad_steps": state.bad_steps,
        "best_ap": state.best_ap,
        "rng": rng_states,
        "world_size": distributed.get_world_size(),
        "config": config_module.config_to_dict(cfg),
        "category_map": category_map,
        "torch_version": str(torch.__version__),
    }


class Trainer:
    """Holds the objects of one run; see ``run_training``."""

    def __init__(self, cfg, resume=None, weights=None, allow_config_change=False):
        self.cfg = cfg
        train_cfg = cfg.train
        rank, world_size, local_rank = distributed.env_world()
        self.device = distributed.select_device(train_cfg.device, local_rank)
        distributed.init_distributed(self.device, train_cfg.dist_timeout_s)
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.is_main = self.rank == 0
        self.output_dir = train_cfg.output_dir
        if train_cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        resume_path = self._resolve_resume(resume)
        checkpoint = None
        if resume_path is not None:
            checkpoint = ckpt_io.load_file(resume_path)
            ckpt_io.check_training_checkpoint(checkpoint, resume_path)
            self._check_resume_folder(resume_path)
            differences = config_differences(checkpoint["config"], config_module.config_to_dict(cfg))
            if differences and not allow_config_change:
                raise ResumeConfigMismatch(
                    f"--resume {resume_path}: the config differs from the one the run was started with:\n  "
                    + "\n  ".join(differences)
                    + "\nResume with the same config (the checkpoint's is in its output folder as config.yaml), "
                      "or pass --allow-config-change to continue with the new values anyway.")
        elif os.path.isfile(os.path.join(self.output_dir, ckpt_io.LAST_NAME)):
            raise FileExistsError(
                f"{self.output_dir} already holds {ckpt_io.LAST_NAME} from an earlier run. Pass --resume auto to "
                "continue that run, or set train.output_dir=<new folder> to start a new one.")

        self.logger = RunLogger(self.output_dir, enabled=self.is_main)
        log = self.logger.info
        environment = describe_environment(self.device)
        log("environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
        self.logger.record("run", {"world_size": self.world_size, **environment})
        log(f"detr_cuda training: world size {self.world_size}, device {self.device}, "
            f"batch {train_cfg.batch_size}/process x {self.world_size} x accumulate {train_cfg.accumulate_steps} "
            f"= {train_cfg.batch_size * self.world_size * train_cfg.accumulate_steps} images per step")
        if self.is_main:
            text = config_module.dump_config(cfg)
            print("resolved config:\n" + text, flush=True)
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as handle:
                handle.write(text)

        # Identical initial weights on every rank (DDP also broadcasts them), different dropout streams.
        seed_everything(train_cfg.seed)
        self.train_dataset, self.val_dataset = build_datasets(cfg, log)
        self.category_map = self.train_dataset.category_map()
        from ..models import build_model
        model, self.criterion, self.postprocessor = build_model(cfg, self.train_dataset.num_classes)
        self.model = model.to(self.device)
        self.criterion.to(self.device)
        n_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log(f"model: {n_parameters / 1e6:.2f}M trainable parameters, {self.train_dataset.num_classes} classes")
        if weights is not None and checkpoint is None:
            load_weights(self.model, weights, category_ids=self.category_map["label_to_category_id"], log=log)
        elif checkpoint is None and random_backbone_frozen_in_part(cfg.model):
            log(RANDOM_FROZEN_BACKBONE_WARNING)
        seed_everything(train_cfg.seed + self.rank)

        from ..data import build_dataloader
        self.train_loader = build_dataloader(self.train_dataset, train_cfg.batch_size, train=True,
                                             distributed=self.world_size > 1, num_workers=cfg.data.num_workers,
                                             seed=train_cfg.seed)
        self.val_loader = None
        if self.val_dataset is not None:
            self.val_loader = build_dataloader(self.val_dataset, cfg.eval.batch_size, train=False,
                                               distributed=self.world_size > 1, num_workers=cfg.data.num_workers,
                                               seed=train_cfg.seed)
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                shield_loader_workers(loader)
        self.steps_per_epoch = max(1, -(-len(self.train_loader) // max(1, train_cfg.accumulate_steps)))
        self.total_steps = train_cfg.epochs * self.steps_per_epoch
        if train_cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, train_cfg.max_steps)

        self.ddp_model = self.wrap_model()
        self.optimizer = build_optimizer(self.model, train_cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, train_cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if train_cfg.amp == "fp16" else None
        self.ema = ModelEMA(self.model, train_cfg.ema_decay) if train_cfg.ema else None
        self.state = TrainState()
        if checkpoint is not None:
            self._restore(checkpoint, resume_path)
        self.stop = StopRequest().install()

    def wrap_model(self):
        """The model DistributedDataParallel-wrapped for a multi-process run (itself otherwise)."""
        if self.world_size == 1:
            return self.model
        # Variants (two-stage, DN) may leave some parameters out of a step's graph.
        return torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True)

    def _resolve_resume(self, resume):
        if resume is None:
            return None
        if resume == "auto":
            found = ckpt_io.find_resume_checkpoint(self.output_dir)
            if found is None and self.is_main:
                print(f"--resume auto: no {ckpt_io.LAST_NAME} in {self.output_dir}; starting a new run", flush=True)
            return found
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such file")
        return resume

    def _check_resume_folder(self, resume_path):
        """Refuses to resume into a folder whose checkpoint_last.pth is not the one being resumed.

        Checkpoints of the continued run go to train.output_dir; when that is not
        the resumed file's folder it must not hold a checkpoint of another run.
        """
        own = os.path.join(self.output_dir, ckpt_io.LAST_NAME)
        if os.path.realpath(os.path.dirname(os.path.abspath(resume_path))) == os.path.realpath(self.output_dir):
            return
        if os.path.exists(own) and not os.path.samefile(own, resume_path):
            raise FileExistsError(
                f"--resume {resume_path}: train.output_dir {self.output_dir} holds another {ckpt_io.LAST_NAME}, "
                f"which the resumed run would overwrite. Resume with train.output_dir="
                f"{os.path.dirname(os.path.abspath(resume_path))} (the checkpoint's folder; the default for "
                "--resume PATH without --config) or a new folder.")
        if self.is_main:
            print(f"--resume {resume_path}: the run continues in train.output_dir {self.output_dir}, "
                  "not in the checkpoint's folder", flush=True)

    def _restore(self, checkpoint, path):
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
        self.state = TrainState(epoch=checkpoint["next_epoch"], batch=checkpoint["next_batch"],
                                step=checkpoint["step"], bad_steps=checkpoint["bad_steps"],
                                best_ap=checkpoint["best_ap"])
        rng_states = checkpoint.get("rng") or []
        if checkpoint.get("world_size") == self.world_size and len(rng_states) == self.world_size:
            ckpt_io.restore_rng_state(rng_states[self.rank])
        else:
            try:
                saved_steps_per_epoch = int(checkpoint["lr_scheduler"]["lr_lambdas"][0]["steps_per_epoch"])
            except (KeyError, IndexError, TypeError, ValueError):
                saved_steps_per_epoch = None
            self.logger.info(world_size_change_message(
                path, checkpoint.get("world_size"), self.world_size, self.state, self.cfg.train.batch_size,
                self.cfg.train.accumulate_steps, saved_steps_per_epoch, self.steps_per_epoch, self.cfg.train.lr_drop))
        self.logger.info(f"resumed {path}: epoch {self.state.epoch}, batch {self.state.batch}, "
                         f"step {self.state.step}, best AP {self.state.best_ap}")

    # ------------------------------------------------------------------------------------------
    def save(self, name, extra_copies=()):
        """Checkpoint of the current state (collective: every rank contributes its RNG state)."""
        rng_states = distributed.all_gather_object(ckpt_io.capture_rng_state())
        if not self.is_main:
            return None
        checkpoint = _make_checkpoint(self.model, self.optimizer, self.lr_scheduler, self.scaler, self.ema,
                                      self.state, self.cfg, self.category_map, rng_states)
        path = os.path.join(self.output_dir, name)
        ckpt_io.save_atomic(checkpoint, path)
        for copy_name in extra_copies:
            ckpt_io.save_atomic(checkpoint, os.path.join(self.output_dir, copy_name))
        return path

    def save_step_checkpoint(self):
        """The mid-epoch checkpoint_last.pth of ``train.checkpoint_every_steps`` (collective)."""
        path = self.save(ckpt_io.LAST_NAME)
        self.logger.info(f"checkpoint at iteration {self.state.step} (epoch {self.state.epoch}, batch "
                         f"{self.state.batch}) written to {path}")

    def stop_requested_on_any_rank(self):
        """Whether SIGTERM / SIGINT reached any process (every rank must take the same branch)."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        return distributed.all_reduce_sum(flag).item() > 0

    def log_stopped(self, path):
        self.logger.info(f"stopped by {self.stop.signal_name or 'a signal to another process'} at iteration "
                         f"{self.state.step}; checkpoint written to {path}; continue with --resume auto")

    def run_evaluation(self):
        eval_model = self.ema.module if self.ema is not None else self.model
        metrics = evaluate(eval_model, self.postprocessor, self.val_loader, self.val_dataset, self.device,
                           self.cfg, self.output_dir, log=self.logger.info)
        headline = scalar_metrics(metrics)
        self.logger.record("eval", {"epoch": self.state.epoch, "iteration": self.state.step,
                                    "ema": self.ema is not None, **headline})
        self.logger.scalars("eval", headline, self.state.step)
        return metrics

    def train(self):
        """Runs to the end; returns 0 (finished or stopped cleanly). Raises on errors."""
        train_cfg = self.cfg.train
        log = self.logger.info
        started = time.time()
        reason = "epoch_done"
        try:
            while self.state.epoch < train_cfg.epochs:
                epoch = self.state.epoch
                self.train_loader.sampler.set_epoch(epoch, skip=self.state.batch * train_cfg.batch_size)
                reason, means = train_one_epoch(
                    self.ddp_model, self.criterion, self.train_loader, self.optimizer, self.lr_scheduler,
                    self.scaler, self.ema, self.state, train_cfg, self.device, self.logger, self.stop,
                    self.total_steps, self.model, save_checkpoint=self.save_step_checkpoint)
                if reason == "epoch_done":
                    self.state.epoch += 1
                    self.state.batch = 0
                record = {"epoch": epoch, "iteration": self.state.step, "finished": reason == "epoch_done",
                          **{f"train_{k}": v for k, v in means.items()}}
                finished_run = reason == "max_steps" or self.state.epoch >= train_cfg.epochs
                due = train_cfg.eval_every > 0 and reason == "epoch_done" and self.state.epoch % train_cfg.eval_every == 0
                is_best = stop_after_evaluation = False
                evaluated = self.val_loader is not None and reason != "stopped" and (due or finished_run)
                if evaluated:
                    # The epoch's training is on disk before a (long) evaluation: a stop, a second
                    # Ctrl-C or a kill during it loses nothing of it.
                    self.save(ckpt_io.LAST_NAME)
                    metrics = self.run_evaluation()
                    record["test_coco_eval_bbox"] = metrics["coco_stats"]
                    if self.state.best_ap is None or metrics["metrics"]["AP"] > self.state.best_ap:
                        self.state.best_ap, is_best = metrics["metrics"]["AP"], True
                    # A signal during the evaluation: stop after it, not after another step.
                    stop_after_evaluation = not finished_run and self.stop_requested_on_any_rank()
                if self.is_main:
                    self.logger.record("epoch", record)
                    self.logger.scalars("epoch", {k: v for k, v in record.items() if k.startswith("train_")},
                                        self.state.step)
                if reason == "stopped":
                    self.log_stopped(self.save(ckpt_io.LAST_NAME))
                    return 0
                copies = [ckpt_io.BEST_NAME] if is_best else []
                if reason == "epoch_done" and train_cfg.keep_epoch_checkpoints:
                    copies.append(f"checkpoint{epoch:04d}.pth")
                epoch_due = reason == "epoch_done" and self.state.epoch % max(1, train_cfg.checkpoint_every) == 0
                steps_due = step_checkpoint_due(self.state.step, train_cfg.checkpoint_every_steps)
                # Saved just before the evaluation: again only for what the evaluation changed.
                already_saved = evaluated and not is_best and not copies
                if (finished_run or is_best or epoch_due or steps_due or stop_after_evaluation) and not already_saved:
                    self.save(ckpt_io.LAST_NAME, copies)
                if stop_after_evaluation:
                    self.log_stopped(os.path.join(self.output_dir, ckpt_io.LAST_NAME))
                    return 0
                if finished_run:
                    break
        except NonFiniteLossError as error:
            path = self.save(ckpt_io.LAST_NAME)
            raise NonFiniteLossError(f"{error}. Stopped; the last good state is saved in {path}. Lower train.lr, "
                                     "check the data, or raise train.max_bad_steps to skip such steps.") from None
        except RuntimeError as error:
            converted = distributed.peer_failure(error, f"training step {self.state.step + 1}")
            if converted is None:
                raise
            raise converted from error
        finally:
            self.stop.uninstall()
        log(f"training finished at iteration {self.state.step} ({reason}) in {format_seconds(time.time() - started)}; "
            f"best AP {self.state.best_ap}")
        return 0

    def close(self):
        """Stops the loaders' workers (they ignore SIGTERM, see signals.py) and closes the logs."""
        try:
            for loader in (self.train_loader, self.val_loader):
                if loader is not None:
                    shutdown_loader_workers(loader)
        finally:
            self.logger.close()


def run_training(cfg, resume=None, weights=None, allow_config_change=False):
    """Entry point for tools/train.py. Returns the process exit code."""
    trainer = Trainer(cfg, resume=resume, weights=weights, allow_config_change=allow_config_change)
    try:
        code = trainer.train()
        # Every rank is done with the process group (rank 0 may still be writing the last
        # checkpoint) before any tears it down: a gloo peer that leaves early can abort the other.
        distributed.barrier()
        return code
    finally:
        trainer.close()
        distributed.cleanup()
