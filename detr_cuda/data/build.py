"""``build_dataset(cfg, split)``: the data set(s) a config names, with their transforms.

``data.train_images`` / ``data.train_annotations`` (and ``val_``) hold one path each or lists of
equal length (several data sets, concatenated: :class:`detr_cuda.data.concat.ConcatDetection`).
Paths left unset are filled from ``data.root`` in the standard layout of ``data.format``
(:data:`ROOT_LAYOUTS`), as the original projects' ``--coco_path``.
"""
import os

from ..util import dist
from .coco import CocoDetection
from .concat import ConcatDetection
from .transforms import build_transforms

SPLITS = ("train", "val")
# data.format -> split -> (image folder, annotations) under data.root
ROOT_LAYOUTS = {
    "coco": {"train": ("train2017", "annotations/instances_train2017.json"),
             "val": ("val2017", "annotations/instances_val2017.json")},
    "yolo": {"train": ("images/train", "data.yaml"), "val": ("images/val", "data.yaml")},
    "voc": {"train": ("JPEGImages", "ImageSets/Main/train.txt"), "val": ("JPEGImages", "ImageSets/Main/val.txt")},
}
_WHAT = {"coco": "instances JSON", "yolo": "data.yaml or class names file",
         "voc": "Annotations folder or ImageSets/Main split list"}


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


def has_split(data_cfg, split):
    """Whether the config names data for ``split`` (the generated set always has both)."""
    if data_cfg.dataset == "synthetic" or data_cfg.root:
        return True
    return any(getattr(data_cfg, f"{split}_{kind}") for kind in ("images", "annotations"))


def configured_paths(data_cfg, split):
    """{"images": (field name, path or list), "annotations": ...} of ``split`` as the config or
    data.root gives them (not checked on disk). Raises ValueError naming an unset field."""
    layout = ROOT_LAYOUTS[data_cfg.format][split]
    columns = {}
    for kind, default in zip(("images", "annotations"), layout):
        name = f"data.{split}_{kind}"
        value = getattr(data_cfg, f"{split}_{kind}")
        if value is None and data_cfg.root:
            value, name = os.path.join(data_cfg.root, default), f"{name} (from data.root)"
        if not value:
            raise ValueError(f"data.dataset=coco needs {name} (the {split} "
                             f"{'image folder' if kind == 'images' else _WHAT[data_cfg.format]}), or data.root")
        columns[kind] = (name, value)
    return columns


def data_sources(data_cfg, split):
    """[(image folder, annotations)] of ``split``: one pair per data set, from the config or
    data.root. Raises ValueError naming an unset field, FileNotFoundError naming a missing path."""
    columns = []
    for name, value in configured_paths(data_cfg, split).values():
        values = value if isinstance(value, list) else [value]
        for index, path in enumerate(values):
            if not os.path.exists(path):
                where = f"{name}[{index}]" if isinstance(value, list) else name
                raise FileNotFoundError(f"{where}: {path} does not exist")
        columns.append(values)
    images, annotations = columns
    if len(images) != len(annotations):  # one given as a list, the other filled from data.root
        raise ValueError(f"data.{split}_images has {len(images)} path(s) but data.{split}_annotations has "
                         f"{len(annotations)}")
    return list(zip(images, annotations))


def build_dataset(cfg, split):
    """The data set of ``split`` ("train" or "val"): a CocoDetection, or a ConcatDetection of one per
    listed data set (categories merged by name). ``data.dataset`` "coco" reads files in
    ``data.format``; "synthetic" the generated set.

    Training split: training transforms (flip, multi-scale, crop); val: the
    evaluation resize. Validation policy, image check and caching come from cfg.data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_cfg = cfg.data
    if data_cfg.dataset == "coco":
        sources, annotation_format = data_sources(data_cfg, split), data_cfg.format
    else:
        sources, annotation_format = [synthetic_paths(data_cfg, split)], "coco"
    parts = [CocoDetection(image_dir, annotations, build_transforms(data_cfg, train=split == "train"),
                           invalid_annotations=data_cfg.invalid_annotations, check_images=data_cfg.check_images,
                           cache_images=data_cfg.cache_images, share_validation=dist.is_dist(),
                           substitute_unreadable=split == "train", annotation_format=annotation_format)
             for image_dir, annotations in sources]
    return parts[0] if len(parts) == 1 else ConcatDetection(parts)
