"""Hungarian matching between predictions and ground truth (focal class cost, L1, GIoU)."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment per image minimising
    cost_class * focal_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).

    forward(outputs {pred_logits (B, Q, K), pred_boxes (B, Q, 4)}, targets list of
    {labels (N_b,), boxes (N_b, 4)}) -> list of B pairs (query_index int64 (n,),
    target_index int64 (n,)), n = min(Q, N_b). Images with no targets give empty pairs.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, pred_logits, pred_boxes, target_labels, target_boxes):
        """(Q', K) logits, (Q', 4) boxes, (T,) labels, (T, 4) boxes -> cost (Q', T)."""
        prob = pred_logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
        positive = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = positive[:, target_labels] - negative[:, target_labels]
        cost_bbox = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        batch, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(target["boxes"]) for target in targets]
        if len(sizes) != batch:
            raise ValueError(f"matcher: {batch} images of predictions but {len(sizes)} targets")
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        target_labels = torch.cat([target["labels"] for target in targets])
        target_boxes = torch.cat([target["boxes"] for target in targets])
        num_classes = outputs["pred_logits"].shape[-1]
        if target_labels.min() < 0 or target_labels.max() >= num_classes:
            raise ValueError(f"matcher: target labels must lie in [0, {num_classes}), "
                             f"got min {int(target_labels.min())} max {int(target_labels.max())}")
        cost = self.cost_matrix(outputs["pred_logits"].flatten(0, 1).float(),
                                outputs["pred_boxes"].flatten(0, 1).float(),
                                target_labels, target_boxes.float())
        if not torch.isfinite(cost).all():
            raise ValueError("matcher: the cost matrix has NaN or inf entries "
                             "(non-finite predictions or degenerate target boxes)")
        cost = cost.view(batch, num_queries, -1).cpu()
        indices = []
        for image, per_image in enumerate(cost.split(sizes, -1)):
            query_index, target_index = linear_sum_assignment(per_image[image].numpy())
            indices.append((torch.as_tensor(query_index, dtype=torch.int64),
                            torch.as_tensor(target_index, dtype=torch.int64)))
        return indices


def build_matcher(cfg):
    loss_cfg = cfg.loss
    return HungarianMatcher(cost_class=loss_cfg.set_cost_class, cost_bbox=loss_cfg.set_cost_bbox,
                            cost_giou=loss_cfg.set_cost_giou, focal_alpha=loss_cfg.focal_alpha,
                            focal_gamma=loss_cfg.focal_gamma)
