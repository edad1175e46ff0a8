"""Deformable DETR: backbone, transformer, heads, matcher, losses, post-processing.

``build_model(cfg, num_classes) -> (model, criterion, postprocessor)`` is the entry point.
"""
from .build import build_model, set_msda_backend
from .checkpoint import load_model_weights, load_state_dict_file, official_coco_category_map
from .criterion import SetCriterion, sigmoid_focal_loss
from .deformable_detr import MLP, DeformableDETR
from .matcher import HungarianMatcher
from .postprocess import PostProcess

__all__ = ["build_model", "set_msda_backend", "DeformableDETR", "MLP", "SetCriterion", "sigmoid_focal_loss", "HungarianMatcher",
           "PostProcess", "load_model_weights", "load_state_dict_file", "official_coco_category_map"]
