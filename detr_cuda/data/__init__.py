"""Datasets, transforms, batching and COCO evaluation.

Entry points: ``build_dataset(cfg, split)`` (one data set, or several concatenated:
``ConcatDetection``), ``build_dataloader(...)``, ``CocoEvaluator`` (see the modules for shapes and
keys). Annotations in COCO JSON, YOLO labels (``yolo.py``) or Pascal VOC XML (``voc.py``) all
become a COCO instances dict (``read_annotations``).
"""
from .build import build_dataset
from .coco import CocoDetection, read_annotations
from .coco_eval import CocoEvaluator, format_metrics
from .concat import ConcatDetection
from .loader import build_dataloader, collate_fn
from .transforms import build_transforms
from .validate import AnnotationFileError, DatasetValidationError
