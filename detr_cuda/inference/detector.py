"""A trained detector ready for use: ``Detector.from_checkpoint(path)`` and ``detector.predict(images)``.

Two kinds of checkpoint are understood:

- ours: the weights (the EMA ones when the run kept them), the resolved config and the category map;
- the official Deformable DETR / DN-DETR releases: weights only; the config must be given and the
  91 class rows are COCO category ids (:meth:`CategoryMap.official_coco`).

The number of classes is read from the class head in the file, so a config does not need
``model.num_classes`` set to load a checkpoint.
"""
import dataclasses
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .. import checkpoint as ckpt_io
from ..categories import CategoryMap
from ..api import resolve_config
from ..config import ConfigError
from ..data.coco import to_rgb
from ..data.loader import collate_fn
from ..data.transforms import build_transforms
from ..models import build_model
from ..util.device import select_device


def read_image(path):
    """RGB PIL image, upright as image viewers show it (a camera's EXIF orientation applied);
    raises OSError/ValueError naming nothing (the caller reports the path).

    Datasets (data/coco.py) keep the stored pixel layout instead: COCO-format
    annotations refer to it.
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def as_pil_image(image):
    """A PIL image, an (H, W, 3) / (H, W) uint8 numpy array or a path -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"a numpy image must be uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got "
                             f"{image.dtype} {image.shape}")
        return to_rgb(Image.fromarray(image))
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    raise TypeError(f"an image must be a PIL image, a uint8 numpy array or a path, got {type(image).__name__}")


@dataclasses.dataclass
class Detector:
    """What inference needs: the model in eval mode, its postprocessor, config and category map."""
    model: torch.nn.Module
    postprocessor: torch.nn.Module
    config: object
    category_map: CategoryMap
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path, config=None, device=None, overrides=(), annotations=None, prefer_ema=True):
        """The detector stored in ``path`` (ours or official) on ``device`` (None / "auto": cuda when
        available, else cpu).

        config: a YAML file or a Config (required for the official files, which hold none; ours hold
        theirs); ``overrides`` ("section.field=value") apply on top. Category map: ``annotations`` (an
        instances JSON) when given, else the checkpoint's, else the official COCO map for a 91-row
        head. Weights that do not make the whole model raise WeightsMismatch naming what is missing.
        """
        checkpoint = ckpt_io.load_file(path)
        state, _ = ckpt_io.model_state(checkpoint, prefer_ema)
        stored_config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
        if config is None and not isinstance(stored_config, dict):
            raise ConfigError(f"{path} holds no config (an official Deformable DETR checkpoint?); pass the "
                              "matching config file (--config configs/....yaml)")
        cfg = resolve_config(stored_config if config is None else config, overrides)
        cfg.model.backbone_weights = None  # every weight comes from the checkpoint
        num_classes = ckpt_io.class_rows(state)
        if num_classes is None:
            raise ckpt_io.CheckpointError(f"{path}: no class head (class_embed) in its weights; not a Deformable "
                                          "DETR checkpoint?")
        categories = CategoryMap.from_annotations(annotations) if annotations is not None \
            else ckpt_io.file_categories(checkpoint, state)
        if categories is None:
            raise ValueError(f"{path} holds no category map and has {num_classes} classes; pass the dataset's "
                             "instances JSON (--annotations) to name them")
        if categories.num_labels != num_classes:
            raise ValueError(f"category map has {categories.num_labels} labels but the checkpoint's class head has "
                             f"{num_classes}")
        cfg.model.num_classes = num_classes
        model, _, postprocessor = build_model(cfg, num_classes)
        ckpt_io.load_for_inference(model, checkpoint, prefer_ema=prefer_ema)
        device = select_device(device)
        model.to(device).eval()
        return cls(model, postprocessor, cfg, categories, device)

    # -- one batch ---------------------------------------------------------------------------------
    def preprocess(self, image):
        """PIL RGB image -> (3, H, W) normalised tensor resized as for evaluation (data.val_short_side,
        data.val_max_size)."""
        transforms = build_transforms(self.config.data, train=False)
        width, height = image.size
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "size": torch.tensor([height, width])}
        tensor, _ = transforms(image, target)
        return tensor

    @torch.no_grad()
    def detect_prepared(self, tensors, image_sizes):
        """Detections for images already through :meth:`preprocess`, one batch.

        ``tensors``: list of (3, H_i, W_i) normalised tensors; ``image_sizes``: the original images'
        (w, h) as PIL gives them. Returns per image ``scores`` (k,), ``labels`` (k,) model labels and
        ``boxes`` (k, 4) absolute xyxy in the image's own pixels (CPU tensors), k = eval.num_select.
        """
        pixels, padding_mask, _ = collate_fn([(tensor, {}) for tensor in tensors])
        outputs = self.model(pixels.to(self.device), padding_mask.to(self.device))
        orig_sizes = torch.tensor([[height, width] for width, height in image_sizes], device=self.device)
        return [{k: v.cpu() for k, v in result.items()} for result in self.postprocessor(outputs, orig_sizes)]

    def detect(self, images):
        """:meth:`detect_prepared` for a list of PIL RGB images."""
        return self.detect_prepared([self.preprocess(image) for image in images], [image.size for image in images])

    def predict(self, images, score_threshold=0.3, batch_size=4):
        """Objects in one image or a list of them (PIL images, uint8 numpy arrays or paths).

        Returns, for one image, a dict (for a list, a list of dicts) with ``boxes`` (n, 4) float32 xyxy
        pixels of that image, ``scores`` (n,), ``labels`` (n,) int64 dataset category ids and ``names``
        (n strings), the detections scoring >= ``score_threshold``, best first. Rows of the model that
        name no category (the unused ids of the official COCO heads) are left out.
        """
        single = not isinstance(images, (list, tuple))
        pictures = [as_pil_image(image) for image in ([images] if single else images)]
        results = []
        for start in range(0, len(pictures), batch_size):
            for detection in self.detect(pictures[start:start + batch_size]):
                results.append(self.named(detection, score_threshold))
        return results[0] if single else results

    def named(self, detection, score_threshold=0.0):
        """A :meth:`detect` result in dataset terms: boxes, scores, category ids (labels) and names."""
        ids = self.category_map.label_to_category_id
        keep = [k for k, (score, label) in enumerate(zip(detection["scores"].tolist(), detection["labels"].tolist()))
                if score >= score_threshold and ids[label] is not None]
        labels = detection["labels"][keep].tolist()
        return {"boxes": detection["boxes"][keep].float(), "scores": detection["scores"][keep],
                "labels": torch.tensor([ids[label] for label in labels], dtype=torch.int64),
                "names": [self.category_map.class_names[label] for label in labels]}
