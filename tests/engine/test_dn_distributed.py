"""The DN loss normaliser is averaged over ranks, also when one rank's batch has no object."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr_cuda.config import DNConfig
from detr_cuda.models.criterion import normaliser
from detr_cuda.models.dn_queries import prepare_dn_queries


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank, world_size, port, gt_counts_per_rank, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        counts = gt_counts_per_rank[rank]
        targets = [{"labels": torch.zeros(n, dtype=torch.long), "boxes": torch.full((n, 4), 0.3)} for n in counts]
        dn = prepare_dn_queries(targets, torch.nn.Embedding(3, 7), 2, 4, DNConfig(enabled=True, dn_groups=3))
        count = 0 if dn is None else len(dn["dn_meta"]["target_labels"])
        results[rank] = float(normaliser(count, torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def test_dn_normaliser_is_the_rank_average_and_survives_an_empty_rank():
    # Rank 0: 2 + 1 objects -> 3 groups x 3 = 9 positive DN queries; rank 1: no object, no DN query.
    gt_counts_per_rank = [[2, 1], [0, 0]]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, free_port(), gt_counts_per_rank, results), nprocs=2, join=True)
        assert dict(results) == {0: 4.5, 1: 4.5}
