"""torch.distributed in one place: the torchrun environment, the process group, collectives.

torchrun (single node, static multi-node or c10d rendezvous) exports RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain ``python`` run
has none of them and is a world of one, for which every helper here is a
no-op (the object itself, rank 0, world size 1). nccl is used on GPUs, gloo
on CPU. Every collective carries the process group's timeout, so a dead peer
makes the survivors raise ``PeerLostError`` (a clear message naming this
rank) within a bounded time instead of hanging forever.
"""
import datetime
import os

import torch
import torch.distributed as dist


class PeerLostError(RuntimeError):
    """Another process of the job died or stopped answering."""


class DistributedSetupError(RuntimeError):
    """The environment asks for a multi-process job that cannot be joined (a launch mistake)."""


def env_world():
    """(rank, world_size, local_rank) from the torchrun environment (0, 1, 0 without it)."""
    def read(name, default):
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from None
    return read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0)


def init_distributed(device, timeout_s):
    """Joins the torchrun job when WORLD_SIZE > 1. Returns (rank, world_size)."""
    rank, world_size, _ = env_world()
    if world_size <= 1 or is_dist():
        return get_rank(), get_world_size()
    if not dist.is_available():
        raise DistributedSetupError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={world_size} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "launch with torchrun (e.g. torchrun --nproc_per_node=2 tools/train.py ...), which sets them")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # Lets nccl collectives notice a dead peer and raise instead of spinning.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return rank, world_size


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def is_dist():
    """True inside an initialised multi-process job."""
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


_PEER_FAILURE_MARKERS = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout",
                         "gloo", "nccl", "socket", "peer")


def peer_failure(error, where):
    """PeerLostError for a RuntimeError raised by a collective (gloo/nccl, or a timeout), else None.

    Collectives also run inside the criterion (the loss normalisers) and inside DDP's backward,
    so the training loop converts errors there with this too.
    """
    if not is_dist() or not isinstance(error, RuntimeError) or isinstance(error, PeerLostError):
        return None
    backend_error = isinstance(error, getattr(dist, "DistError", ()))
    text = str(error).lower()
    if not backend_error and not any(marker in text for marker in _PEER_FAILURE_MARKERS):
        return None
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PeerLostError(
        f"rank {get_rank()}/{get_world_size()}: {where} failed: another process of the job died, was killed "
        f"or stopped answering within train.dist_timeout_s ({type(error).__name__}: {first_line}). "
        "Check the other ranks' logs; restart the job with --resume auto to continue from the last checkpoint.")


def _collective(name, function):
    """Runs a collective; a failure caused by a lost peer becomes PeerLostError."""
    try:
        return function()
    except RuntimeError as error:  # gloo/nccl errors and timeouts (DistBackendError is a RuntimeError)
        converted = peer_failure(error, name)
        if converted is None:
            raise
        raise converted from error


def all_reduce_sum(tensor):
    """In-place sum over ranks; returns the tensor."""
    if is_dist():
        _collective("all_reduce", lambda: dist.all_reduce(tensor))
    return tensor


def mean_over_ranks(tensor):
    """The average of ``tensor`` over ranks (a new tensor; the input is left alone). No host sync."""
    if not is_dist():
        return tensor
    return all_reduce_sum(tensor.clone()) / get_world_size()


def reduce_dict_mean(values, device):
    """{name: float} averaged over the ranks that report each name (all ranks must call it)."""
    if not is_dist():
        return dict(values)
    names = sorted(set().union(*all_gather_object(sorted(values))))
    if not names:
        return {}
    sums = torch.tensor([float(values.get(name, 0.0)) for name in names]
                        + [1.0 if name in values else 0.0 for name in names], dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    totals, counts = sums[:len(names)], sums[len(names):].clamp(min=1)
    return {name: value for name, value in zip(names, (totals / counts).tolist())}


def all_gather_object(obj):
    """List of every rank's ``obj`` (``[obj]`` for a world of one)."""
    if not is_dist():
        return [obj]
    gathered = [None] * get_world_size()
    _collective("all_gather_object", lambda: dist.all_gather_object(gathered, obj))
    return gathered


def broadcast_object(obj, src=0):
    """``obj`` from rank ``src`` on every rank (what the others pass is ignored)."""
    if not is_dist():
        return obj
    holder = [obj]
    _collective("broadcast_object", lambda: dist.broadcast_object_list(holder, src=src))
    return holder[0]


def barrier():
    if is_dist():
        _collective("barrier", dist.barrier)
