"""``build_dataset(cfg, split)``: the dataset a config names, with its transforms."""
import os

from ..util import dist
from .coco import CocoDetection
from .transforms import build_transforms

SPLITS = ("train", "val")


def synthetic_paths(data_cfg, split):
    """Generates the built-in set for ``split`` under ``data_cfg.synthetic_dir`` if needed; returns its paths.

    Under torch.distributed only rank 0 writes; the others wait at a barrier.
    """
    from .synthetic import generate_synthetic_coco  # keeps `python -m detr_cuda.data.synthetic` clean

    num_images = data_cfg.synthetic_train_images if split == "train" else data_cfg.synthetic_val_images
    seed = data_cfg.synthetic_seed + (0 if split == "train" else 1)
    args = (os.path.join(data_cfg.synthetic_dir, split), num_images, data_cfg.synthetic_image_size, seed)
    if dist.is_main_process():
        paths = generate_synthetic_coco(*args)
    dist.barrier()
    if not dist.is_main_process():
        paths = generate_synthetic_coco(*args)  # finds the set rank 0 wrote; writes nothing
    return paths["images"], paths["annotations"]


def coco_paths(data_cfg, split):
    """(image folder, annotation file) of ``split`` from the config; an error naming a missing one."""
    fields = (f"{split}_images", f"{split}_annotations")
    paths = [getattr(data_cfg, name) for name in fields]
    for name, path in zip(fields, paths):
        if not path:
            raise ValueError(f"data.dataset=coco needs data.{name} (path to the {split} "
                             f"{'image folder' if name.endswith('images') else 'instances JSON'})")
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.{name}: {path} does not exist")
    return paths


def build_dataset(cfg, split):
    """CocoDetection of ``split`` ("train" or "val") for ``cfg.data.dataset`` "coco" or "synthetic".

    Training split: training transforms (flip, multi-scale, crop); val: the
    evaluation resize. Validation policy, image check and caching come from cfg.data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_cfg = cfg.data
    if data_cfg.dataset == "coco":
        image_dir, annotation_file = coco_paths(data_cfg, split)
    else:
        image_dir, annotation_file = synthetic_paths(data_cfg, split)
    return CocoDetection(image_dir, annotation_file, build_transforms(data_cfg, train=split == "train"),
                         invalid_annotations=data_cfg.invalid_annotations, check_images=data_cfg.check_images,
                         cache_images=data_cfg.cache_images, share_validation=dist.is_dist(),
                         substitute_unreadable=split == "train")
