"""Inference over image files: files, folders and globs in; COCO results JSON (dataset category ids
and names) and drawn pictures out. ``tools/infer.py`` is a thin command line over :func:`run_inference`."""
import glob
import json
import os
import sys
import time

from .detector import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
                tensor = detector.preprocess(image)
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
