"""Deformable DETR: backbone, transformer, heads, matcher, losses, post-processing.

``build_model(cfg, num_classes) -> (model, criterion, postprocessor)`` is the entry point.
"""
from .build import build_model
from .criterion import SetCriterion, sigmoid_focal_loss
from .deformable_detr import DeformableDETR
from .matcher import HungarianMatcher
from .mlp import MLP
from .postprocess import PostProcess

__all__ = ["build_model", "DeformableDETR", "MLP", "SetCriterion", "sigmoid_focal_loss", "HungarianMatcher",
           "PostProcess"]
