"""Batching: padding collate, a reproducible (distributed) sampler, and the DataLoader builder."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


def collate_fn(batch):
    """[(image (3, H_i, W_i), target), ...] -> (images (B, 3, H, W), padding_mask (B, H, W), targets).

    Images are zero-padded at the bottom/right to the largest H and W of the
    batch; ``padding_mask`` is True on padded pixels. ``targets`` is the list
    of target dicts unchanged (boxes stay normalised to each unpadded image).
    """
    images, targets = zip(*batch)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    padding_mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, image in enumerate(images):
        padded[i, :, :image.shape[1], :image.shape[2]].copy_(image)
        padding_mask[i, :image.shape[1], :image.shape[2]] = False
    return padded, padding_mask, list(targets)


def sample_seed(seed, epoch, index):
    """Seed of the augmentation of sample ``index`` in ``epoch`` (a pure function, 63 bits)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class ReproducibleSampler(DistributedSampler):
    """DistributedSampler (also used with one process) yielding (index, augmentation seed) pairs.

    The order of epoch e is a function of (seed, e) only, and each sample's
    augmentation seed of (seed, e, index), so the data of a run does not depend
    on the number of workers and a resumed run can reproduce any epoch:
    call ``set_epoch(epoch, skip=n)`` to start after this rank's first n samples.
    With several processes the sampler pads by repeating indices so every rank
    gets the same count; evaluation drops the repeats by image id.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, with_seeds=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.with_seeds = with_seeds
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __len__(self):
        return max(0, self.num_samples - self.skip)

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        if not self.with_seeds:
            return iter(indices)
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in indices])


def seed_worker(worker_id):
    """Seeds Python's and numpy's generators in a worker from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2 ** 32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def build_dataloader(dataset, batch_size, train, distributed=False, num_workers=0, seed=0):
    """DataLoader yielding (images, padding_mask, targets) batches (see :func:`collate_fn`).

    train: shuffled, each sample augmented with a seed from (seed, epoch,
    index); call ``loader.sampler.set_epoch(epoch)`` every epoch (also with one
    process). eval: in order, no augmentation seeds.
    distributed: the sampler splits the data over ``torch.distributed`` ranks;
    the last batches keep ``drop_last=False`` semantics (a short final batch).
    Pinned memory when CUDA is available; persistent workers when num_workers > 0.
    """
    if distributed:
        num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    else:
        num_replicas, rank = 1, 0
    sampler = ReproducibleSampler(dataset, num_replicas, rank, shuffle=train, seed=seed, with_seeds=train)
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
