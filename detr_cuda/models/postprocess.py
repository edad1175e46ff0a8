"""Turns model outputs into scored, labelled boxes in absolute image coordinates."""
import torch
from torch import nn

from ..util.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-k over all (query, class) pairs, as in Deformable DETR.

    forward(outputs {pred_logits (B, Q, K), pred_boxes (B, Q, 4)}, target_sizes (B, 2) (h, w))
    -> list of B dicts {scores (k,), labels (k,) int64 model labels, boxes (k, 4) absolute xyxy},
    k = min(num_select, Q * K). A query may appear with several labels.
    """

    def __init__(self, num_select=100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2) (h, w), "
                             f"got {tuple(target_sizes.shape)}")
        batch, num_queries, num_classes = logits.shape
        prob = logits.float().sigmoid()
        k = min(self.num_select, num_queries * num_classes)
        scores, flat_index = torch.topk(prob.view(batch, -1), k, dim=1)
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        boxes = box_cxcywh_to_xyxy(boxes.float())
        boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).repeat(1, 1, 4))
        height, width = target_sizes.to(boxes).unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def build_postprocessor(cfg):
    return PostProcess(num_select=cfg.eval.num_select)
