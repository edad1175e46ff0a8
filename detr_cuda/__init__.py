"""detr_cuda: Deformable DETR with DN training on a custom MSDeformAttn operator.

The public Python API (each name is imported on first use, so ``import detr_cuda`` stays cheap and
imports neither torch nor the model code)::

    detector = detr_cuda.Detector.from_checkpoint("outputs/run/checkpoint_best.pth")
    result = detector.predict("photo.jpg", score_threshold=0.5)   # boxes, scores, labels, names

    model, criterion, postprocessor = detr_cuda.build("configs/deformable_detr.yaml", num_classes=80)
    config = detr_cuda.load_config("configs/demo.yaml", ["train.lr=1e-4"])
"""
import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    "Detector": ("detr_cuda.inference.detector", "Detector"),
    "build": ("detr_cuda.api", "build"),
    "load_config": ("detr_cuda.config", "load_config"),
    "Config": ("detr_cuda.config", "Config"),
    "CategoryMap": ("detr_cuda.categories", "CategoryMap"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'detr_cuda' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
