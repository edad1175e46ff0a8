"""Inference over image files: files, folders and globs in; COCO results JSON (dataset category ids
and names) and drawn pictures out. ``tools/infer.py`` is a thin command line over :func:`run_inference`."""
import glob
import json
import os
import sys
import time

from ..data.folders import image_ids_from_names, list_image_files
from .detector import read_image
from .drawing import draw_detections, shared_colour_indices

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
            paths.extend(os.path.join(item, name) for name in list_image_files(item))
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            paths.extend(sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p)))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not paths:
        raise FileNotFoundError(f"no image files in {list(map(str, inputs))}")
    return list(dict.fromkeys(paths))


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


def to_coco_results(image_id, named, file_name):
    """One image's :meth:`Detector.named` detections -> COCO results entries (bbox xywh pixels,
    dataset category id and name, file name)."""
    return [{"image_id": image_id, "category_id": category_id, "category_name": name,
             "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
             "score": round(score, 5), "file_name": file_name}
            for box, score, category_id, name in zip(named["boxes"].tolist(), named["scores"].tolist(),
                                                     named["labels"].tolist(), named["names"])]


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
        return detector.detect_prepared(tensors, image_sizes)
    except Exception as error:  # noqa: BLE001 -- retried image by image below, which reports each error
        if len(tensors) == 1:
            return [error]
    detections = []
    for tensor, size in zip(tensors, image_sizes):
        try:
            detections.append(detector.detect_prepared([tensor], [size])[0])
        except Exception as error:  # noqa: BLE001 -- the caller skips this image by path with its error
            detections.append(error)
    return detections


def _read_batch(detector, paths, skip):
    """(paths, PIL images, preprocessed tensors) of the files of ``paths`` that can be read and
    resized; ``skip(path, what, error)`` is called for the others."""
    kept_paths, images, tensors = [], [], []
    for path in paths:
        try:
            image = read_image(path)
        except Exception as error:  # PIL raises many kinds for broken files; report them all
            skip(path, "unreadable", error)
            continue
        try:
            tensor = detector.preprocess(image)
        except Exception as error:  # noqa: BLE001 -- one image that cannot be resized loses only itself
            skip(path, "unprocessable", error)
            continue
        kept_paths.append(path)
        images.append(image)
        tensors.append(tensor)
    return kept_paths, images, tensors


class PictureWriter:
    """Writes ``out_dir/images/<name>`` pictures with a detector's boxes: the input's bare name, in
    ``image_format`` ("png", "jpg" or None: PNG stays PNG, anything else becomes JPEG), made unique
    when two inputs share a name."""

    def __init__(self, out_dir, category_map, image_format=None):
        if image_format not in (None, "png", "jpg"):
            raise ValueError(f"image_format must be None (as the input), 'png' or 'jpg', got {image_format!r}")
        self.folder = os.path.join(out_dir, "images")
        os.makedirs(self.folder, exist_ok=True)
        self.image_format = image_format
        self.palette = shared_colour_indices(category_map.class_names)
        self.used_names = set()

    def write(self, path, image, named):
        stem, extension = os.path.splitext(os.path.basename(path))
        extension = "." + self.image_format if self.image_format else (
            ".png" if extension.lower() == ".png" else ".jpg")
        out_name, copy = stem + extension, 1
        while out_name in self.used_names:  # same file name in two input folders
            copy += 1
            out_name = f"{stem}_{copy}{extension}"
        self.used_names.add(out_name)
        picture = draw_detections(image, named["boxes"], named["names"], named["scores"],
                                  colour_keys=[self.palette[name] for name in named["names"]])
        out_path = os.path.join(self.folder, out_name)
        picture.save(out_path, **({"quality": 92} if extension == ".jpg" else {}))
        return out_path


def run_inference(detector, paths, out_dir, batch_size=2, score_threshold=0.3, json_score_threshold=0.0,
                  draw=True, image_format=None, progress=True, log=None):
    """Detects objects in every image of ``paths``; writes ``out_dir/results.json`` (COCO results,
    dataset category ids, plus ``category_name`` and ``file_name``) and, with ``draw``, one picture
    per image in ``out_dir/images/`` with the boxes scoring >= ``score_threshold``.

    ``file_name`` is the path relative to the inputs' common folder (:func:`result_file_names`);
    image ids come from the names of the files that were read (:func:`image_ids_from_names`).
    A file that cannot be read, resized or run through the model is reported on ``log`` (stderr)
    by path with its error and skipped; results.json holds the others.
    Returns {"results": [...], "skipped": [(path, reason)], "images": [written picture paths],
    "boxes_above_threshold": boxes scoring >= score_threshold in all images, "empty": [(path, best
    score or None)] of the images with none}.
    """
    log = log or sys.stderr
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    os.makedirs(out_dir, exist_ok=True)
    pictures = PictureWriter(out_dir, detector.category_map, image_format) if draw else None
    file_names = result_file_names(paths)
    meter = Progress(len(paths)) if progress else None
    kept, skipped, written, empty, above = {}, [], [], [], 0

    def skip(path, what, error):
        reason = f"{type(error).__name__}: {error}"
        skipped.append((path, reason))
        log.write(f"skipping {what} image {path}: {reason}\n")
        if meter:
            meter.update()

    for start in range(0, len(paths), batch_size):
        batch_paths, batch_images, batch_tensors = _read_batch(detector, paths[start:start + batch_size], skip)
        if not batch_images:
            continue
        detections = _predict_each_on_failure(detector, batch_tensors, [image.size for image in batch_images])
        for path, image, detection in zip(batch_paths, batch_images, detections):
            if isinstance(detection, Exception):
                skip(path, "failed", detection)
                continue
            kept[path] = detector.named(detection, json_score_threshold)
            shown = detector.named(detection, score_threshold)
            above += len(shown["scores"])
            if not len(shown["scores"]):
                scores = detector.named(detection)["scores"]
                empty.append((path, float(scores.max()) if len(scores) else None))
            if pictures is not None:
                written.append(pictures.write(path, image, shown))
            if meter:
                meter.update()
    image_ids = image_ids_from_names(list(kept))
    results = [entry for path, named in kept.items()
               for entry in to_coco_results(image_ids[path], named, file_names[path])]
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(results, handle)
    return {"results": results, "skipped": skipped, "images": written, "boxes_above_threshold": above,
            "empty": empty}
