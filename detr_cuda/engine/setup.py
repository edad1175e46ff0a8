"""What a training run is made of, built in order: process and device, the resume plan, logs, data,
model and weights, loaders, optimizer, schedule, scaler, EMA, and the restored state of a resumed
run. :class:`detr_cuda.engine.trainer.Trainer` is the loop over them."""
import collections
import os
import random

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from .. import config as config_module
from ..util import dist
from ..util.device import select_device
from . import resume as resume_policy
from .diagnostics import describe_environment, random_backbone_warning
from .ema import ModelEMA
from .logger import RunLogger
from .optim import build_lr_scheduler, build_optimizer
from .resume import TrainState
from .signals import StopRequest, shield_loader_workers, shutdown_loader_workers


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class RunSetUp:
    """The objects of one run (see the module docstring); the Trainer subclass trains with them."""

    def __init__(self, cfg, resume=None, weights=None, allow_config_change=False):
        self.cfg = cfg
        train_cfg = cfg.train
        _, _, local_rank = dist.env_world()
        self.device = select_device(train_cfg.device, local_rank)
        dist.init_distributed(self.device, train_cfg.dist_timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.output_dir = train_cfg.output_dir
        if train_cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        resume_path, checkpoint, changes = self._resume_plan(resume, allow_config_change)
        self.logger = RunLogger(self.output_dir, enabled=self.is_main)
        self._log_start(changes)

        # Identical initial weights on every rank (DDP also broadcasts them), different dropout streams.
        seed_everything(train_cfg.seed)
        self._build_data()
        self._build_model(weights if checkpoint is None else None, fresh=checkpoint is None)
        seed_everything(train_cfg.seed + self.rank)
        self._build_loaders()
        self._build_optimisation()
        self.state = TrainState()
        self.saved = None           # (step, epoch, batch, best_ap) of the last checkpoint_last.pth written
        self.recent_step_times = collections.deque(maxlen=50)  # for the ETA
        if checkpoint is not None:
            self._restore(checkpoint, resume_path, changes)
        self.stop = StopRequest().install()

    # -- set-up ------------------------------------------------------------------------------------
    def _resume_plan(self, resume, allow_config_change):
        """(path, checkpoint, config changes that take effect) of --resume, or (None, None, [])."""
        announce = print if self.is_main else (lambda message: None)
        path = resume_policy.resolve_resume_path(resume, self.output_dir, announce)
        if path is None:
            if os.path.isfile(os.path.join(self.output_dir, ckpt_io.LAST_NAME)):
                raise FileExistsError(
                    f"{self.output_dir} already holds {ckpt_io.LAST_NAME} from an earlier run. Pass --resume auto to "
                    "continue that run, or set train.output_dir=<new folder> to start a new one.")
            return None, None, []
        checkpoint = resume_policy.load_training_checkpoint(path)
        resume_policy.check_output_folder(path, self.output_dir, announce)
        changes = resume_policy.check_config_change(checkpoint["config"], config_module.config_to_dict(self.cfg),
                                                    path, allow_config_change)
        return path, checkpoint, changes

    def _log_start(self, changes):
        train_cfg, log = self.cfg.train, self.logger.info
        environment = describe_environment(self.device)
        log("environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
        self.logger.record("run", {"world_size": self.world_size, **environment})
        log(f"detr_cuda training: world size {self.world_size}, device {self.device}, "
            f"batch {train_cfg.batch_size}/process x {self.world_size} x accumulate {train_cfg.accumulate_steps} "
            f"= {train_cfg.batch_size * self.world_size * train_cfg.accumulate_steps} images per step")
        if not self.is_main:
            return
        for path in ckpt_io.remove_stale_temporaries(self.output_dir):
            log(f"removed {path}, left by a checkpoint write that was killed")
        text = config_module.dump_config(self.cfg)
        print("resolved config:\n" + text, flush=True)
        with open(os.path.join(self.output_dir, "config.yaml"), "w") as handle:
            handle.write(text)
        if changes:
            log("config changes that take effect from the next step:\n  " + "\n  ".join(changes))

    def _build_data(self):
        from ..data import build_dataset
        from ..data.build import has_split
        log = self.logger.info
        self.train_dataset = build_dataset(self.cfg, "train")
        log(self.train_dataset.summary())
        self.val_dataset = None
        if self.cfg.train.eval_every < 0:
            log("train.eval_every=-1: no evaluation in this run")
        elif not has_split(self.cfg.data, "val"):
            log("no validation set (data.val_images / data.val_annotations unset): no evaluation in this run")
        else:
            self.val_dataset = build_dataset(self.cfg, "val")
            log(self.val_dataset.summary())
        # What the model's class rows mean (several training sets: their categories merged by name); stored
        # in every checkpoint, and evaluation scores each validation set's categories through it by name.
        self.categories = self.train_dataset.categories

    def _build_model(self, weights, fresh):
        from ..models import build_model
        log = self.logger.info
        model, self.criterion, self.postprocessor = build_model(self.cfg, self.categories.num_labels)
        self.model = model.to(self.device)
        self.criterion.to(self.device)
        n_parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log(f"model: {n_parameters / 1e6:.2f}M trainable parameters, {self.categories.num_labels} classes")
        if weights is not None:
            ckpt_io.describe_report(ckpt_io.load_weights(self.model, weights, self.categories), log)
        elif fresh and random_backbone_warning(self.cfg.model):
            log(random_backbone_warning(self.cfg.model))

    def _build_loaders(self):
        from ..data import build_dataloader
        train_cfg, workers = self.cfg.train, self.cfg.data.num_workers
        self.train_loader = build_dataloader(self.train_dataset, train_cfg.batch_size, train=True,
                                             distributed=self.world_size > 1, num_workers=workers, seed=train_cfg.seed)
        self.val_loader = None
        if self.val_dataset is not None:
            self.val_loader = build_dataloader(self.val_dataset, self.cfg.eval.batch_size, train=False,
                                               distributed=self.world_size > 1, num_workers=workers,
                                               seed=train_cfg.seed)
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                shield_loader_workers(loader)
        self.steps_per_epoch = max(1, -(-len(self.train_loader) // train_cfg.accumulate_steps))
        self.total_steps = train_cfg.epochs * self.steps_per_epoch
        if train_cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, train_cfg.max_steps)

    def wrap_model(self):
        """The model DistributedDataParallel-wrapped for a multi-process run (itself otherwise)."""
        if self.world_size == 1:
            return self.model
        # find_unused_parameters=False in every variant: each step's loss reaches every trainable
        # parameter (tests/engine/test_unused_parameters.py checks each variant, with and without
        # objects). Two-stage: the proposal heads and the encoder output layers feed the encoder loss
        # and the query selection; nothing of the single-stage path (reference_points, query_embed)
        # is built there. DN: a batch without objects has no DN query, so the DN label book
        # (label_enc) joins the graph through a zero-weighted term (models/anchor_detr.py).
        # Zero-weighted losses stay in the graph too (engine/trainer.py weighted_total).
        # With True, DDP searches the graph on every step and warns that it found nothing.
        return torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=False)

    def _build_optimisation(self):
        train_cfg = self.cfg.train
        self.ddp_model = self.wrap_model()
        self.optimizer = build_optimizer(self.model, train_cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, train_cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if train_cfg.amp == "fp16" else None
        self.ema = ModelEMA(self.model, train_cfg.ema_decay) if train_cfg.ema else None
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]

    def _restore(self, checkpoint, path, changes):
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if changes:
            resume_policy.apply_learning_rates(self.optimizer, self.lr_scheduler, self.cfg.train)
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.decay = self.cfg.train.ema_decay
        self.state = TrainState(epoch=checkpoint["next_epoch"], batch=checkpoint["next_batch"],
                                step=checkpoint["step"], bad_steps=checkpoint["bad_steps"],
                                best_ap=checkpoint["best_ap"])
        self.saved = self._state_key()
        rng_states = checkpoint.get("rng") or []
        if checkpoint.get("world_size") == self.world_size and len(rng_states) == self.world_size:
            resume_policy.restore_rng_state(rng_states[self.rank])
        else:
            try:
                saved_steps_per_epoch = int(checkpoint["lr_scheduler"]["lr_lambdas"][0]["steps_per_epoch"])
            except (KeyError, IndexError, TypeError, ValueError):
                saved_steps_per_epoch = None
            self.logger.info(resume_policy.world_size_change_message(
                path, checkpoint.get("world_size"), self.world_size, self.state, self.cfg.train.batch_size,
                self.cfg.train.accumulate_steps, saved_steps_per_epoch, self.steps_per_epoch, self.cfg.train.lr_drop))
        self.logger.info(f"resumed {path}: epoch {self.state.epoch}, batch {self.state.batch}, "
                         f"step {self.state.step}, best AP {self.state.best_ap}")
        if changes:
            lrs = ", ".join(f"{group['name']} {group['lr']:.3g}" for group in self.optimizer.param_groups)
            self.logger.info(f"learning rates from the config at step {self.state.step}: {lrs}")

    # -- the run -----------------------------------------------------------------------------------
    def close(self):
        """Stops the loaders' workers (they ignore SIGTERM, see signals.py) and closes the logs."""
        try:
            for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
                if loader is not None:
                    shutdown_loader_workers(loader)
        finally:
            self.logger.close()


