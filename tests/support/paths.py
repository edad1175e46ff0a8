"""Where the test data lives: the real COCO128 subset shared next to the repository."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def coco128_dir():
    """Path of coco128 (env DETR_CUDA_COCO128, else ../shared/data/coco128 next to the repo, or one
    level further up for a git worktree); the test is skipped with a message when it is absent."""
    candidates = [os.environ.get("DETR_CUDA_COCO128"),
                  os.path.join(REPO_ROOT, "..", "shared", "data", "coco128"),
                  os.path.join(REPO_ROOT, "..", "..", "shared", "data", "coco128")]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "annotations.json")):
            return os.path.abspath(path)
    pytest.skip("coco128 not found: set DETR_CUDA_COCO128 or place it at ../shared/data/coco128 "
                "(relative to the repository root)")
