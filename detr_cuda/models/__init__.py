"""Deformable DETR, DN-Deformable-DETR and DINO: backbone, transformer, heads, matcher, losses, post-processing.

``build_model(cfg, num_classes) -> (model, criterion, postprocessor)`` is the entry point.
"""
from .build import build_model
from .criterion import SetCriterion, sigmoid_focal_loss
from .deformable_detr import DeformableDETR
from .dino import DINO
from .matcher import HungarianMatcher
from .mlp import MLP
from .postprocess import PostProcess

__all__ = ["build_model", "DeformableDETR", "DINO", "MLP", "SetCriterion", "sigmoid_focal_loss", "HungarianMatcher",
           "PostProcess"]
