"""Box format conversions and (generalised) IoU. Boxes are (..., 4) tensors."""
import torch


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes):
    """(N, 4) xyxy -> (N,)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> iou (N, M), union (N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise GIoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M).

    The boxes must not be degenerate (x1 >= x0, y1 >= y0): the datasets drop such ground truth
    when they load, and predicted cxcywh boxes (sigmoid outputs) never are. Not checked here, as
    that would be a host sync on every call; a non-finite box gives a non-finite loss, which the
    training loop catches.
    """
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] (Deformable DETR's eps 1e-5)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
