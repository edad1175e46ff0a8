"""Running tools/train.py and tools/eval.py in subprocesses: launchers, free ports, logs.

Every launch has a timeout, so a hung distributed job fails the test instead of CI.
"""
import json
import os
import socket
import subprocess
import sys

from .configs import RUN_TINY
from .paths import REPO_ROOT
TRAIN = os.path.join(REPO_ROOT, "tools", "train.py")
EVAL = os.path.join(REPO_ROOT, "tools", "eval.py")
BASE_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yaml")


def tiny_args(tmp_path, output="run", extra=()):
    """Arguments of tools/train.py for the tiny config writing into tmp_path/output."""
    return ["--config", BASE_CONFIG, *RUN_TINY, f"data.synthetic_dir={tmp_path / 'synthetic'}",
            f"train.output_dir={tmp_path / output}", *extra]


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(threads=1):
    """Environment for child processes: this checkout first on the path, few threads."""
    child = dict(os.environ)
    child["PYTHONPATH"] = REPO_ROOT + os.pathsep + child.get("PYTHONPATH", "")
    child["OMP_NUM_THREADS"] = str(threads)
    child.pop("RANK", None), child.pop("WORLD_SIZE", None), child.pop("LOCAL_RANK", None)
    return child


def run(args, timeout=240, cwd=REPO_ROOT, **kwargs):
    """Runs a command to completion (with a timeout) in ``cwd``; returns the CompletedProcess with text output."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=kwargs.pop("env", env()),
                          cwd=cwd, **kwargs)


def train(args, timeout=240):
    return run([sys.executable, TRAIN, *args], timeout=timeout)


def torchrun(nproc, args, port, timeout=300, extra_launch=()):
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra_launch]
    if not extra_launch:
        launch += ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    return run([*launch, TRAIN, *args], timeout=timeout)


def read_log(output_dir, kind=None):
    """The JSON records of output_dir/log.jsonl (optionally only those of one type)."""
    with open(os.path.join(output_dir, "log.jsonl")) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if kind is None or r["type"] == kind]


def explain(result):
    """Failure message with the tail of a child's output."""
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


def write_fixed_coco(folder, num_images=2, size=64, seed=0):
    """A COCO-format set of equal-size images with coloured rectangles (no padding in any batch).

    Returns the overrides that point data.* at it (train and val).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = np.full((size, size, 3), 90, dtype=np.uint8) + rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            category = int(rng.choice([1, 5]))
            pixels[y:y + h, x:x + w] = (220, 40, 40) if category == 1 else (40, 40, 220)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"{image_id:04d}.png"
        Image.fromarray(pixels).save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    annotation_file = folder / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "red"}, {"id": 5, "name": "blue"}]}))
    return ["data.dataset=coco", f"data.train_images={image_dir}", f"data.train_annotations={annotation_file}",
            f"data.val_images={image_dir}", f"data.val_annotations={annotation_file}"]
