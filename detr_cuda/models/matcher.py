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
    Target labels must lie in [0, K) (checked when a dataset loads, not here: it would cost a host
    sync per decoder layer).
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
        return self.match_sets([(outputs, targets)])[0]

    @torch.no_grad()
    def match_sets(self, sets, device=None):
        """Matches several prediction sets at once: [(outputs, targets), ...] -> [indices, ...] as
        :meth:`forward` returns them. Every cost matrix is computed on the device and all go to the
        host together: one host sync for all the decoder layers of a step. With ``device`` (a CUDA
        device) all the resulting indices go back there in one non-blocking copy."""
        costs, shapes = [], []
        for outputs, targets in sets:
            batch, num_queries = outputs["pred_logits"].shape[:2]
            sizes = [len(target["boxes"]) for target in targets]
            if len(sizes) != batch:
                raise ValueError(f"matcher: {batch} images of predictions but {len(sizes)} targets")
            shapes.append((batch, num_queries, sizes))
            if sum(sizes) == 0:
                continue
            target_labels = torch.cat([target["labels"] for target in targets])
            target_boxes = torch.cat([target["boxes"] for target in targets])
            cost = self.cost_matrix(outputs["pred_logits"].flatten(0, 1).float(),
                                    outputs["pred_boxes"].flatten(0, 1).float(), target_labels, target_boxes.float())
            costs.append(cost.flatten())
        host_costs = torch.cat(costs).cpu() if costs else None
        if host_costs is not None and not torch.isfinite(host_costs).all():
            # Non-finite predictions: match anyway; their loss is non-finite too, and the training
            # loop's one check of the total loss deals with it.
            host_costs = torch.nan_to_num(host_costs, nan=1e8, posinf=1e8, neginf=-1e8)
        results, offset = [], 0
        empty = torch.empty(0, dtype=torch.int64)
        for batch, num_queries, sizes in shapes:
            total = sum(sizes)
            if total == 0:
                results.append([(empty, empty) for _ in sizes])
                continue
            cost = host_costs[offset:offset + batch * num_queries * total].view(batch, num_queries, total)
            offset += batch * num_queries * total
            indices = []
            for image, per_image in enumerate(cost.split(sizes, -1)):
                query_index, target_index = linear_sum_assignment(per_image[image].numpy())
                indices.append((torch.as_tensor(query_index, dtype=torch.int64),
                                torch.as_tensor(target_index, dtype=torch.int64)))
            results.append(indices)
        if device is not None:
            results = _indices_to(results, torch.device(device))
        return results


def _indices_to(results, device):
    """``results`` of :meth:`HungarianMatcher.match_sets` with every index tensor on ``device``,
    copied in one transfer (from pinned memory to a GPU: no stall of the host)."""
    flat = [tensor for indices in results for pair in indices for tensor in pair]
    if not flat:
        return results
    joined = torch.cat(flat)
    if device.type == "cuda":
        joined = joined.pin_memory()
    moved = joined.to(device, non_blocking=device.type == "cuda").split([len(t) for t in flat])
    position, out = 0, []
    for indices in results:
        out.append([(moved[position + 2 * i], moved[position + 2 * i + 1]) for i in range(len(indices))])
        position += 2 * len(indices)
    return out


def build_matcher(cfg):
    loss_cfg = cfg.loss
    return HungarianMatcher(cost_class=loss_cfg.set_cost_class, cost_bbox=loss_cfg.set_cost_bbox,
                            cost_giou=loss_cfg.set_cost_giou, focal_alpha=loss_cfg.focal_alpha,
                            focal_gamma=loss_cfg.focal_gamma)
