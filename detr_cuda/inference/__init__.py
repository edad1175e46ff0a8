"""Using a trained detector: inference on image files, pictures, evaluation plots, export.

- :mod:`.predictor`: ``load_detector`` (our checkpoints or the official ones), ``run_inference``
  (files, folders, globs -> COCO results JSON + drawn pictures).
- :mod:`.drawing`: PIL pictures (boxes, side by side, sampling points).
- :mod:`.attention`: decoder cross-attention sampling locations through a forward hook.
- :mod:`.visualize`: ground truth vs predictions, a query's sampling points.
- :mod:`.eval_plots`: ``write_eval_plots`` (per-class AP bars, PR curves; matplotlib optional).
- :mod:`.export`: ONNX (reference operator) and torch.export programs.

Imports models, data and engine; nothing below it imports this package.
"""
from .predictor import CategoryMap, Detector, list_images, load_detector, run_inference

__all__ = ["CategoryMap", "Detector", "list_images", "load_detector", "run_inference"]
