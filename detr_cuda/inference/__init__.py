"""Using a trained detector: inference on images and files, pictures, evaluation plots, export.

- :mod:`.detector`: ``Detector.from_checkpoint`` (our checkpoints or the official ones),
  ``detector.predict(images)`` (PIL images, numpy arrays or paths -> boxes, scores, category ids, names).
- :mod:`.image_files`: ``run_inference`` (files, folders, globs -> COCO results JSON + drawn pictures).
- :mod:`.drawing`: PIL pictures (boxes, side by side, sampling points).
- :mod:`.attention`: decoder cross-attention sampling locations through a forward hook.
- :mod:`.visualize`: ground truth vs predictions, a query's sampling points.
- :mod:`.eval_plots`: ``write_eval_plots`` (per-class AP bars, PR curves; matplotlib optional).
- :mod:`.export`: ONNX (reference operator) and torch.export programs.

Imports models and data (never engine); nothing below it imports this package.
"""
from .detector import Detector, read_image
from .image_files import list_images, run_inference

__all__ = ["Detector", "list_images", "read_image", "run_inference"]
