import torch

from detr_cuda.config import DataConfig
from detr_cuda.data import CocoDetection, build_dataloader, build_transforms, collate_fn
from detr_cuda.data.loader import ReproducibleSampler
from detr_cuda.data.synthetic import generate_synthetic_coco


def _target(image_id, n):
    return {"boxes": torch.rand(n, 4), "labels": torch.zeros(n, dtype=torch.int64),
            "image_id": torch.tensor(image_id)}


def test_collate_pads_to_the_largest_image_and_masks_padding():
    a, b = torch.randn(3, 4, 7), torch.randn(3, 6, 5)
    images, mask, targets = collate_fn([(a, _target(1, 2)), (b, _target(2, 0))])
    assert images.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :7], a) and torch.equal(images[1, :, :6, :5], b)
    assert (images[0, :, 4:] == 0).all() and (images[1, :, :, 5:] == 0).all()
    assert not mask[0, :4, :7].any() and mask[0, 4:].all()
    assert not mask[1, :6, :5].any() and mask[1, :, 5:].all()
    assert [t["image_id"].item() for t in targets] == [1, 2]


def test_sampler_order_depends_only_on_seed_and_epoch_and_can_skip():
    data = list(range(10))
    sampler = ReproducibleSampler(data, shuffle=True, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for i, _ in epoch0) == data and epoch0 != epoch1
    sampler.set_epoch(0, skip=4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 6
    other = ReproducibleSampler(data, shuffle=True, seed=3)
    other.set_epoch(1)
    assert list(other) == epoch1


def test_distributed_split_covers_everything_with_padding_repeats():
    data = list(range(5))
    parts = [list(ReproducibleSampler(data, num_replicas=2, rank=r, shuffle=False, with_seeds=False))
             for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3
    assert sorted(set(parts[0] + parts[1])) == data  # one index repeated to even out the ranks


def test_dataloader_is_reproducible_across_worker_counts(tmp_path):
    paths = generate_synthetic_coco(tmp_path / "syn", num_images=6, image_size=64, seed=0)
    cfg = DataConfig(train_short_sides=[32, 48, 64], train_max_size=80, crop_resize_sides=[40, 50],
                     crop_min_size=20, crop_max_size=40)
    dataset = CocoDetection(paths["images"], paths["annotations"], build_transforms(cfg, train=True))

    def run(num_workers):
        loader = build_dataloader(dataset, batch_size=2, train=True, num_workers=num_workers, seed=7)
        batches = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            batches += list(loader)
        return batches

    single, multi = run(0), run(2)
    assert len(single) == 6
    for (images_a, mask_a, targets_a), (images_b, mask_b, targets_b) in zip(single, multi):
        assert torch.equal(images_a, images_b) and torch.equal(mask_a, mask_b)
        for t_a, t_b in zip(targets_a, targets_b):
            assert torch.equal(t_a["boxes"], t_b["boxes"]) and t_a["image_id"] == t_b["image_id"]


def test_eval_loader_keeps_dataset_order(tmp_path):
    paths = generate_synthetic_coco(tmp_path / "syn", num_images=5, image_size=64, seed=1)
    dataset = CocoDetection(paths["images"], paths["annotations"],
                            build_transforms(DataConfig(val_short_side=48, val_max_size=64), train=False))
    loader = build_dataloader(dataset, batch_size=2, train=False)
    ids = [t["image_id"].item() for _, _, targets in loader for t in targets]
    assert ids == [1, 2, 3, 4, 5]
