"""Run by test_train_distributed: one forward/backward of the first batch through the real Trainer
set-up (data, sampler, DDP wrap, criterion); rank 0 saves rank-averaged losses and the gradients.

    [torchrun ...] python tests/support/dist_probe.py OUT.pth --config CONFIG key=value ...
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from detr_cuda.config import load_config  # noqa: E402
from detr_cuda.util import dist  # noqa: E402
from detr_cuda.engine.trainer import Trainer, weighted_total  # noqa: E402
from detr_cuda.util.device import move_to_device  # noqa: E402


def main(out_path, config_path, overrides):
    trainer = Trainer(load_config(config_path, overrides))
    # float64: at initialisation many queries predict nearly the same box, and float32 rounding
    # differences between batch shapes can flip near-tied Hungarian matches.
    trainer.model.double()
    trainer.ddp_model = trainer.wrap_model()
    trainer.train_loader.sampler.set_epoch(0)
    images, masks, targets = move_to_device(*next(iter(trainer.train_loader)), trainer.device)
    images = images.double()
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    trainer.ddp_model.train()
    losses = trainer.criterion(trainer.ddp_model(images, masks, targets), targets)
    total = weighted_total(losses, trainer.criterion.weight_dict)
    total.backward()  # DDP averages the gradients over ranks here
    values = dist.reduce_dict_mean({"loss": total.item(), **{k: v.item() for k, v in losses.items()}},
                                          trainer.device)
    if dist.is_main_process():
        grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        image_ids = dist.all_gather_object([int(t["image_id"]) for t in targets])
        torch.save({"losses": values, "grads": grads, "image_ids": image_ids}, out_path)
    else:
        dist.all_gather_object([int(t["image_id"]) for t in targets])
    dist.barrier()  # as run_training: no rank tears the process group down while another still uses it
    trainer.close()
    dist.cleanup()


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--config":
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[3], sys.argv[4:])
