"""Datasets, transforms, batching and COCO evaluation.

Entry points: ``build_dataset(cfg, split)``, ``build_dataloader(...)``,
``CocoEvaluator`` (see the modules for shapes and keys).
"""
from .build import build_dataset
from .coco import CocoDetection
from .coco_eval import CocoEvaluator, format_metrics
from .loader import build_dataloader, collate_fn
from .transforms import build_transforms
from .validate import AnnotationFileError, DatasetValidationError
