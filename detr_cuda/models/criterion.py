"""SetCriterion: Hungarian-matched sigmoid focal, L1 and GIoU losses on every decoder layer."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def sigmoid_focal_loss(logits, targets, num_boxes, alpha=0.25, gamma=2.0):
    """Focal loss (Lin et al. 2017) summed over every (image, query, class), divided by num_boxes.

    logits, targets: (B, Q, K), targets one-hot (all zeros for unmatched queries).
    Equals the original's mean over queries times Q.
    """
    prob = logits.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """Losses of Deformable DETR.

    forward(outputs, targets) -> dict of unweighted losses:
        loss_ce, loss_bbox, loss_giou (last decoder layer), the same with suffix
        ``_{i}`` for aux layer i (aux_outputs), and ``_enc`` for the two-stage encoder
        proposals (class-agnostic: every target label is 0); class_error (logging only).
    ``weight_dict`` maps every weighted key to its coefficient. Each layer is matched on its own.
    ``num_boxes`` (the normaliser) is the number of target boxes, summed over ranks and
    divided by the world size when torch.distributed is initialised, at least 1.
    """

    def __init__(self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0,
                 losses=("labels", "boxes")):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.losses = list(losses)

    @staticmethod
    def _src_permutation_idx(indices):
        """(image index, query index) of every matched prediction."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Sigmoid focal loss against one-hot targets; unmatched queries target all zeros."""
        src_logits = outputs["pred_logits"].float()  # losses in float32 also under autocast
        batch_idx, src_idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)]).to(src_logits.device)
        target_onehot = torch.zeros_like(src_logits)
        target_onehot[batch_idx.to(src_logits.device), src_idx.to(src_logits.device), target_classes_o] = 1.0
        losses = {"loss_ce": sigmoid_focal_loss(src_logits, target_onehot, num_boxes,
                                                self.focal_alpha, self.focal_gamma)}
        if log:
            with torch.no_grad():
                if target_classes_o.numel() == 0:
                    class_error = src_logits.new_zeros(())  # nothing matched: no error to report
                else:
                    predicted = src_logits[batch_idx, src_idx].argmax(-1)
                    class_error = 100.0 - 100.0 * (predicted == target_classes_o).float().mean()
            losses["class_error"] = class_error
        return losses

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 on (cx, cy, w, h) and 1 - GIoU on xyxy of matched pairs, each summed / num_boxes."""
        batch_idx, src_idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx].float()
        target_boxes = torch.cat([t["boxes"][J] for t, (_, J) in zip(targets, indices)], 0).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def get_loss(self, name, outputs, targets, indices, num_boxes, **kwargs):
        loss_functions = {"labels": self.loss_labels, "boxes": self.loss_boxes}
        if name not in loss_functions:
            raise ValueError(f"unknown loss '{name}' (known: {', '.join(loss_functions)})")
        return loss_functions[name](outputs, targets, indices, num_boxes, **kwargs)

    @staticmethod
    def compute_num_boxes(targets, device):
        """Average number of target boxes per rank (float, >= 1)."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

    def matched_losses(self, outputs, targets, num_boxes, suffix="", log=True):
        """Matches one prediction set and returns its losses with ``suffix`` on every key."""
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            kwargs = {"log": log} if name == "labels" else {}
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes, **kwargs))
        return {key + suffix: value for key, value in losses.items()}

    def forward(self, outputs, targets):
        device = outputs["pred_logits"].device
        num_boxes = self.compute_num_boxes(targets, device)
        last_layer = {k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        losses = self.matched_losses(last_layer, targets, num_boxes)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.matched_losses(aux_outputs, targets, num_boxes, suffix=f"_{i}", log=False))
        if "enc_outputs" in outputs:
            binary_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            losses.update(self.matched_losses(outputs["enc_outputs"], binary_targets, num_boxes,
                                              suffix="_enc", log=False))
        return losses


def build_weight_dict(cfg):
    """Loss coefficients for the last layer, every aux layer and the two-stage encoder."""
    loss_cfg, model_cfg = cfg.loss, cfg.model
    base = {"loss_ce": loss_cfg.cls_loss_coef, "loss_bbox": loss_cfg.bbox_loss_coef,
            "loss_giou": loss_cfg.giou_loss_coef}
    weight_dict = dict(base)
    if model_cfg.aux_loss:
        for i in range(model_cfg.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    if model_cfg.two_stage:
        weight_dict.update({f"{k}_enc": v for k, v in base.items()})
    return weight_dict


def build_criterion(cfg, num_classes, matcher):
    return SetCriterion(num_classes, matcher, build_weight_dict(cfg), focal_alpha=cfg.loss.focal_alpha,
                        focal_gamma=cfg.loss.focal_gamma)
