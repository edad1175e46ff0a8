"""What a run says about itself when something needs explaining: the environment (for bug reports),
a backbone kept frozen at random weights, and a non-finite loss (which terms, outputs and images)."""
import os
import subprocess

import torch

from ..util import dist


def describe_environment(device):
    """Versions, device, threads and the git commit of this checkout."""
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


def random_backbone_warning(model_cfg):
    """The WARNING for a run that would keep randomly initialised backbone layers frozen (no ImageNet
    weights given), or None."""
    if model_cfg.backbone_weights or not (model_cfg.freeze_stem_and_layer1 or not model_cfg.train_backbone):
        return None
    return ("WARNING: model.backbone_weights is not set, so the ResNet starts from random weights, and "
            "model.freeze_stem_and_layer1=true (or train_backbone=false) keeps part of it frozen at them. "
            "The published recipes start from ImageNet weights: pass model.backbone_weights=PATH (torchvision's "
            "resnet50-19c8e357.pth for the paper's numbers), or --weights PATH, or set "
            "model.freeze_stem_and_layer1=false to train from scratch.")


def non_finite_names(outputs, prefix=""):
    """Names of the tensors in a (nested) output dict that hold NaN or inf (host syncs: only called
    after a non-finite loss)."""
    names = []
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            names += non_finite_names(value, f"{prefix}{key}.")
    elif isinstance(outputs, (list, tuple)):
        for index, value in enumerate(outputs):
            names += non_finite_names(value, f"{prefix}{index}.")
    elif torch.is_tensor(outputs) and outputs.is_floating_point() and not torch.isfinite(outputs.detach()).all():
        names.append(prefix.rstrip("."))
    return names


def non_finite_message(state, outputs, loss_dict, total, targets, bad_ranks):
    """Where the loss went non-finite, on which ranks, which terms and outputs, and the image ids."""
    where = (f"non-finite loss at iteration {state.step + 1} (epoch {state.epoch}, batch {state.batch - 1}) on "
             f"{int(bad_ranks)} rank(s)")
    rank = dist.get_rank()
    if torch.isfinite(total.detach()).all():
        detail = "this rank's loss is finite"
    else:
        terms = ", ".join(f"{name}={value.item():.4g}" for name, value in loss_dict.items()
                          if not torch.isfinite(value.detach()).all())
        bad_outputs = non_finite_names(outputs)
        detail = f"total {total.item():.4g}; non-finite loss terms on rank {rank}: {terms}"
        if bad_outputs:
            detail += "; the model's outputs are already non-finite: " + ", ".join(bad_outputs[:6]) + (
                " ..." if len(bad_outputs) > 6 else "")
    image_ids = [int(t["image_id"]) for t in targets if "image_id" in t]
    return f"{where}: {detail}; image ids {image_ids}"
