"""Where and in which precision the model runs: device choice, autocast, moving a batch there."""
import contextlib

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(requested="auto", local_rank=0):
    """torch.device for ``requested``: "auto" takes cuda:LOCAL_RANK when a GPU is visible, else the CPU;
    "cpu", "cuda" (cuda:LOCAL_RANK) or an explicit "cuda:N". A CUDA device without a visible GPU, or
    a LOCAL_RANK beyond the GPUs of the node, is an error that says so."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {requested} requested but no CUDA GPU is visible to torch "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"cuda:{index} requested but only {torch.cuda.device_count()} GPUs are visible "
                           "(with torchrun, --nproc_per_node must not exceed the GPUs of the node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def autocast_context(device, amp):
    """torch.autocast for ``train.amp`` "bf16" / "fp16" on ``device``; a no-op context for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def move_to_device(images, masks, targets, device):
    """A collated batch (images, padding masks, list of target dicts) on ``device``."""
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    masks = masks.to(device, non_blocking=non_blocking)
    targets = [{key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
                for key, value in target.items()} for target in targets]
    return images, masks, targets
