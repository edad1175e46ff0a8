"""A detector ready for inference: checkpoint -> (model, postprocessor, config, category map), and
image files -> detections in the dataset's own category ids.

Two kinds of checkpoint are understood:

- ours: a dict with ``model`` (state dict), ``config`` (the resolved config as
  a dict) and the category map (``category_map`` = {``label_to_category_id``,
  ``class_names``}, as ``CocoDetection.category_map()`` returns it);
- the official Deformable DETR release: ``model`` only (plus ``args``); the
  config must be given (``config_path``) and the 91 logits are COCO category
  ids (see :mod:`detr_cuda.models.checkpoint`).

The number of classes is read from the class head in the state dict, so a
config does not need ``model.num_classes`` set to load a checkpoint.
"""
import dataclasses
import glob
import json
import os
import sys
import time

import torch
from PIL import Image, ImageOps

from detr_cuda.config import ConfigError, apply_override, config_from_dict, load_config, parse_override
from detr_cuda.data.coco import load_instances_json, to_rgb
from detr_cuda.data.loader import collate_fn
from detr_cuda.data.transforms import build_transforms
from detr_cuda.engine.checkpoint import load_file
from detr_cuda.engine.weights import extract_state_dict as stored_weights
from detr_cuda.models import build_model, load_model_weights
from detr_cuda.models.checkpoint import OFFICIAL_COCO_NUM_CLASSES, extract_state_dict

from .coco_categories import COCO_CATEGORY_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class CategoryMap:
    """Model label -> dataset category. ``label_to_category_id[label]`` is None for a label that
    names no category (label 0 and the unused ids of the official 91-logit COCO heads)."""
    label_to_category_id: list
    class_names: list

    def __post_init__(self):
        if len(self.label_to_category_id) != len(self.class_names):
            raise ValueError(f"category map: {len(self.label_to_category_id)} category ids but "
                             f"{len(self.class_names)} class names")

    @property
    def num_labels(self):
        return len(self.label_to_category_id)

    def category_names(self):
        """{category id: name} over the labels that name a category."""
        return {cat: name for cat, name in zip(self.label_to_category_id, self.class_names) if cat is not None}

    @classmethod
    def official_coco(cls):
        """The 91-logit official checkpoints: logit i scores COCO category id i."""
        ids = [i if i in COCO_CATEGORY_NAMES else None for i in range(OFFICIAL_COCO_NUM_CLASSES)]
        names = [COCO_CATEGORY_NAMES.get(i, f"unused-{i}") for i in range(OFFICIAL_COCO_NUM_CLASSES)]
        return cls(ids, names)

    @classmethod
    def from_annotations(cls, annotation_file):
        """Sorted category ids of an instances JSON (the label order CocoDetection uses)."""
        categories = sorted(load_instances_json(annotation_file)["categories"], key=lambda c: c["id"])
        return cls([int(c["id"]) for c in categories], [str(c.get("name", c["id"])) for c in categories])

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The map stored in one of our checkpoints, or None when it holds none."""
        stored = checkpoint.get("category_map")
        if stored is None and "label_to_category_id" in checkpoint:
            stored = checkpoint
        if stored is None:
            return None
        # data's CocoDetection.category_map() spells the keys out; "ids" / "names" is the short form.
        ids = [int(i) for i in (stored.get("label_to_category_id") or stored.get("ids") or [])]
        if not ids:
            raise ValueError(f"checkpoint category map has no category ids (keys: {sorted(stored)})")
        names = stored.get("class_names") or stored.get("names") or [str(i) for i in ids]
        return cls(ids, [str(n) for n in names])


@dataclasses.dataclass
class Detector:
    """What inference needs: the model in eval mode, its postprocessor, config and category map."""
    model: torch.nn.Module
    postprocessor: torch.nn.Module
    config: object
    category_map: CategoryMap
    device: torch.device


def _num_classes_in_state(state, source):
    for key in ("class_embed.0.weight", "class_embed.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise ValueError(f"{source}: no class head (class_embed.0.weight) in the state dict; not a Deformable DETR "
                     "checkpoint?")


def resolve_device(device):
    """'auto' -> cuda when available, else cpu; anything else as torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def load_detector(checkpoint_path, config_path=None, overrides=(), device="auto", annotations=None,
                  prefer_ema=True):
    """Builds the detector stored in ``checkpoint_path`` (ours or official) on ``device``.

    config: ``config_path`` when given, else the checkpoint's own (so an official checkpoint,
    which holds none, needs ``config_path``); ``overrides`` ("section.field=value") apply on top.
    Category map: ``annotations`` (an instances JSON) when given, else the checkpoint's, else the
    official COCO map for a 91-logit head; anything else is an error. ``prefer_ema``: our
    checkpoints' EMA weights when the run kept them.
    """
    checkpoint = load_file(checkpoint_path)
    state = extract_state_dict(stored_weights(checkpoint, prefer_ema)[0], str(checkpoint_path))
    stored_config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if config_path is not None:
        cfg = load_config(config_path)
    elif isinstance(stored_config, dict):
        cfg = config_from_dict(stored_config)
    else:
        raise ConfigError(f"{checkpoint_path} holds no config (an official Deformable DETR checkpoint?); "
                          "pass the matching config file (--config configs/....yaml)")
    for text in overrides:
        apply_override(cfg, *parse_override(text))
    # Every weight comes from the checkpoint: do not read an ImageNet backbone file first.
    cfg.model.backbone_weights = None
    num_classes = _num_classes_in_state(state, checkpoint_path)

    category_map = CategoryMap.from_checkpoint(checkpoint) if isinstance(checkpoint, dict) else None
    if annotations is not None:
        category_map = CategoryMap.from_annotations(annotations)
    if category_map is None:
        if num_classes != OFFICIAL_COCO_NUM_CLASSES:
            raise ValueError(f"{checkpoint_path} holds no category map and has {num_classes} classes; pass the "
                             "dataset's instances JSON (--annotations) to name them")
        category_map = CategoryMap.official_coco()
    if category_map.num_labels != num_classes:
        raise ValueError(f"category map has {category_map.num_labels} labels but the checkpoint's class head has "
                         f"{num_classes}")

    cfg.model.num_classes = num_classes
    model, _, postprocessor = build_model(cfg, num_classes)
    load_model_weights(model, state, strict=True)
    device = resolve_device(device)
    model.to(device).eval()
    return Detector(model, postprocessor, cfg, category_map, device)


def list_images(inputs):
    """Image paths from files, folders (their image files, sorted, not recursive) and glob patterns.

    A file is taken whatever its extension (an unreadable one is reported when read); a
    folder contributes files with an image extension. Raises when nothing matches.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = []
    for item in map(str, inputs):
        if os.path.isdir(item):
            paths.extend(sorted(os.path.join(item, name) for name in os.listdir(item)
                                if name.lower().endswith(IMAGE_EXTENSIONS)))
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            paths.extend(sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p)))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not paths:
        raise FileNotFoundError(f"no image files in {list(map(str, inputs))}")
    return list(dict.fromkeys(paths))


def read_image(path):
    """RGB PIL image, upright as image viewers show it (a camera's EXIF orientation applied);
    raises OSError/ValueError naming nothing (the caller reports the path).

    Datasets (data/coco.py) keep the stored pixel layout instead: COCO-format
    annotations refer to it.
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


class Progress:
    """Plain progress on stderr: ``label done/total  rate  ETA``. Rewrites one line on a terminal;
    elsewhere (logs, CI) prints a line every ``every`` fraction of the total."""

    def __init__(self, total, label="infer", stream=None, every=0.1):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self.step = max(1, int(self.total * every))
        self.done = 0
        self.start = time.monotonic()
        self._last_printed = 0

    def update(self, count=1):
        self.done += count
        finished = self.done >= self.total
        if not self.interactive and not finished and self.done - self._last_printed < self.step:
            return
        self._last_printed = self.done
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        text = (f"{self.label} {self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%) "
                f"{rate:.2f} img/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        end = "\n" if finished or not self.interactive else ""
        self.stream.write(("\r" if self.interactive else "") + text + end)
        self.stream.flush()


def preprocess(image, data_cfg):
    """PIL RGB image -> (3, H, W) normalised tensor resized as for evaluation (val_short_side,
    val_max_size)."""
    transforms = build_transforms(data_cfg, train=False)
    width, height = image.size
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "size": torch.tensor([height, width])}
    tensor, _ = transforms(image, target)
    return tensor


@torch.no_grad()
def predict_images(detector, images):
    """Detections for a list of PIL RGB images, one batch.

    Returns one dict per image: ``scores`` (k,), ``labels`` (k,) model labels,
    ``boxes`` (k, 4) absolute xyxy in the image's own pixels (CPU tensors).
    """
    return predict_prepared(detector, [preprocess(image, detector.config.data) for image in images],
                            [image.size for image in images])


@torch.no_grad()
def predict_prepared(detector, tensors, image_sizes):
    """Detections for images already through :func:`preprocess`, one batch.

    ``tensors``: list of (3, H_i, W_i) normalised tensors; ``image_sizes``: list of the original
    images' (w, h) as PIL gives them. Returns what :func:`predict_images` returns.
    """
    pixels, padding_mask, _ = collate_fn([(tensor, {}) for tensor in tensors])
    outputs = detector.model(pixels.to(detector.device), padding_mask.to(detector.device))
    orig_sizes = torch.tensor([[height, width] for width, height in image_sizes], device=detector.device)
    return [{k: v.cpu() for k, v in result.items()} for result in detector.postprocessor(outputs, orig_sizes)]


def to_coco_results(image_id, detection, category_map, score_threshold=0.0, file_name=None):
    """One image's detections -> COCO results entries (bbox xywh, dataset category id and name).

    Detections whose label names no category are dropped.
    """
    entries = []
    for score, label, box in zip(detection["scores"].tolist(), detection["labels"].tolist(),
                                 detection["boxes"].tolist()):
        category_id = category_map.label_to_category_id[label]
        if category_id is None or score < score_threshold:
            continue
        entry = {"image_id": image_id, "category_id": category_id,
                 "category_name": category_map.class_names[label],
                 "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                 "score": round(score, 5)}
        if file_name is not None:
            entry["file_name"] = file_name
        entries.append(entry)
    return entries


def assign_image_ids(paths):
    """{path: image id}: the file name's number when every stem is a distinct integer (COCO's
    000000000009.jpg -> 9), else 1..N in order."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {p: int(s) for p, s in zip(paths, stems)}
    return {p: i + 1 for i, p in enumerate(paths)}


def result_file_names(paths):
    """{path: name for results.json}: the path relative to the folder that holds all inputs, so a
    single input folder gives bare file names (as COCO's ``file_name``) and dupA/x.jpg, dupB/x.jpg
    stay apart; the path as given when the inputs share no folder (other drives)."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    try:
        common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    except ValueError:
        return {p: p for p in paths}
    return {p: os.path.relpath(a, common) for p, a in zip(paths, absolute)}


def _predict_each_on_failure(detector, tensors, image_sizes):
    """Detections for one batch; when the batch fails, each image on its own so only the failing
    ones are lost. Returns a list with a detection dict or the exception per image."""
    try:
        return predict_prepared(detector, tensors, image_sizes)
    except Exception as error:  # noqa: BLE001 -- retried image by image below, which reports each error
        if len(tensors) == 1:
            return [error]
    detections = []
    for tensor, size in zip(tensors, image_sizes):
        try:
            detections.append(predict_prepared(detector, [tensor], [size])[0])
        except Exception as error:  # noqa: BLE001 -- the caller skips this image by path with its error
            detections.append(error)
    return detections


def run_inference(detector, paths, out_dir, batch_size=2, score_threshold=0.3, json_score_threshold=0.0,
                  draw=True, image_format=None, progress=True, log=None):
    """Detects objects in every image of ``paths``; writes ``out_dir/results.json`` (COCO results,
    dataset category ids, plus ``category_name`` and ``file_name``) and, with ``draw``, one picture
    per image in ``out_dir/images/`` with the boxes scoring >= ``score_threshold``.

    ``file_name`` is the path relative to the inputs' common folder (:func:`result_file_names`).
    A file that cannot be read, resized or run through the model is reported on ``log`` (stderr)
    by path with its error and skipped; results.json holds the others.
    Returns {"results": [...], "skipped": [(path, reason)], "images": [written picture paths]}.
    """
    from .drawing import draw_detections

    log = log or sys.stderr
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_format not in (None, "png", "jpg"):
        raise ValueError(f"image_format must be None (as the input), 'png' or 'jpg', got {image_format!r}")
    os.makedirs(out_dir, exist_ok=True)
    picture_dir = os.path.join(out_dir, "images")
    if draw:
        os.makedirs(picture_dir, exist_ok=True)
    image_ids = assign_image_ids(paths)
    file_names = result_file_names(paths)
    meter = Progress(len(paths)) if progress else None
    results, skipped, written = [], [], []
    used_names = set()

    def skip(path, what, error):
        reason = f"{type(error).__name__}: {error}"
        skipped.append((path, reason))
        log.write(f"skipping {what} image {path}: {reason}\n")
        if meter:
            meter.update()

    for start in range(0, len(paths), batch_size):
        batch_paths, batch_images, batch_tensors = [], [], []
        for path in paths[start:start + batch_size]:
            try:
                image = read_image(path)
            except Exception as error:  # PIL raises many kinds for broken files; report them all
                skip(path, "unreadable", error)
                continue
            try:
                tensor = preprocess(image, detector.config.data)
            except Exception as error:  # noqa: BLE001 -- one image that cannot be resized loses only itself
                skip(path, "unprocessable", error)
                continue
            batch_paths.append(path)
            batch_images.append(image)
            batch_tensors.append(tensor)
        if not batch_images:
            continue
        detections = _predict_each_on_failure(detector, batch_tensors, [image.size for image in batch_images])
        for path, image, detection in zip(batch_paths, batch_images, detections):
            if isinstance(detection, Exception):
                skip(path, "failed", detection)
                continue
            name = os.path.basename(path)
            results.extend(to_coco_results(image_ids[path], detection, detector.category_map,
                                           json_score_threshold, file_name=file_names[path]))
            if draw:
                stem, extension = os.path.splitext(name)
                extension = "." + image_format if image_format else (
                    ".png" if extension.lower() == ".png" else ".jpg")
                out_name = stem + extension
                if out_name in used_names:  # same file name in two input folders
                    out_name = f"{stem}_{image_ids[path]}{extension}"
                used_names.add(out_name)
                keep = detection["scores"] >= score_threshold
                names = [detector.category_map.class_names[label] for label in detection["labels"][keep].tolist()]
                picture = draw_detections(image, detection["boxes"][keep], names, detection["scores"][keep])
                out_path = os.path.join(picture_dir, out_name)
                if extension == ".jpg":
                    picture.save(out_path, quality=92)
                else:
                    picture.save(out_path)
                written.append(out_path)
            if meter:
                meter.update()
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(results, handle)
    return {"results": results, "skipped": skipped, "images": written}
