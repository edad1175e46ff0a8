"""SetCriterion: the losses of Deformable DETR (Hungarian-matched sigmoid focal, L1 and GIoU on every
decoder layer and the two-stage encoder proposals) and, on DN training steps, the DN losses
(fixed one-to-one targets of the noised ground-truth queries, no matching)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..util import dist
from ..util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

BASE_LOSS_KEYS = ("loss_ce", "loss_bbox", "loss_giou")
DN_LOSS_KEYS = ("loss_dn_ce", "loss_dn_bbox", "loss_dn_giou")


def sigmoid_focal_loss(logits, targets, num_boxes, alpha=0.25, gamma=2.0):
    """Focal loss (Lin et al. 2017) summed over every (image, query, class), divided by num_boxes.

    logits, targets: (B, Q, K) (or (N, K)), targets one-hot (all zeros for unmatched queries).
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


def normaliser(count, device):
    """A loss normaliser: ``count`` (this rank's boxes) averaged over ranks, at least 1, as a float32
    0-d tensor on ``device`` (no host sync). Every rank must call it (an all-reduce)."""
    value = dist.mean_over_ranks(torch.full((), float(count), dtype=torch.float32, device=device))
    return torch.clamp(value, min=1)


def dn_loss_terms(pred_logits, pred_boxes, dn_meta, num_dn_boxes, focal_alpha=0.25, focal_gamma=2.0):
    """DN losses of one decoder layer with the fixed one-to-one targets.

    Args:
        pred_logits: (B, P, K) DN part of the class logits.
        pred_boxes: (B, P, 4) DN part of the boxes, cxcywh.
        dn_meta: from ``dn_queries.prepare_dn_queries``.
        num_dn_boxes: normaliser (positive DN queries averaged over ranks), like num_boxes.
    Returns:
        dict with ``loss_dn_ce`` (focal; positives target their clean label, contrastive negatives
        target no object), ``loss_dn_bbox`` (L1 on cxcywh) and ``loss_dn_giou`` (1 - GIoU), positives only.
    """
    pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()  # losses in float32 under autocast
    pos_image, pos_slot = dn_meta["positive_index"]
    labels = dn_meta["target_labels"]
    logits = pred_logits[pos_image, pos_slot]
    onehot = F.one_hot(labels, pred_logits.shape[-1]).to(logits.dtype)
    if dn_meta["negative_index"] is not None:
        neg_image, neg_slot = dn_meta["negative_index"]
        negatives = pred_logits[neg_image, neg_slot]
        logits = torch.cat([logits, negatives])
        onehot = torch.cat([onehot, torch.zeros_like(negatives)])
    loss_ce = sigmoid_focal_loss(logits, onehot, num_dn_boxes, focal_alpha, focal_gamma)
    boxes = pred_boxes[pos_image, pos_slot]
    target_boxes = dn_meta["target_boxes"]
    loss_bbox = F.l1_loss(boxes, target_boxes, reduction="sum") / num_dn_boxes
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes)))
    loss_giou = (1 - giou).sum() / num_dn_boxes
    return {"loss_dn_ce": loss_ce, "loss_dn_bbox": loss_bbox, "loss_dn_giou": loss_giou}


class SetCriterion(nn.Module):
    """Losses of Deformable DETR, plus the DN losses when the outputs carry them.

    forward(outputs, targets) -> dict of unweighted losses:
        loss_ce, loss_bbox, loss_giou (last decoder layer), the same with suffix ``_{i}`` for aux
        layer i (aux_outputs), ``_enc`` for the two-stage encoder proposals (enc_outputs,
        class-agnostic: every target label is 0), ``_interm`` for DINO's selected proposals
        (interm_outputs, the real classes); class_error (logging only);
        on a DN step (``dn_meta`` in outputs): loss_dn_ce, loss_dn_bbox, loss_dn_giou and their
        ``_{i}`` for the aux layers, zeros for a batch without objects (dn_meta None).
    ``weight_dict`` maps every weighted key to its coefficient. Each layer is matched on its own
    (all layers' cost matrices go to the host together: one sync per step). The normalisers are
    the number of target boxes (and of positive DN queries) averaged over ranks, at least 1.
    Target labels must lie in [0, num_classes) (the datasets check this when they load).
    """

    def __init__(self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

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

    def matched_losses(self, outputs, targets, indices, num_boxes, suffix="", log=True):
        """The losses of one matched prediction set, ``suffix`` on every key."""
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return {key + suffix: value for key, value in losses.items()}

    def dn_losses(self, outputs):
        """The DN losses of every decoder layer (see the class docstring)."""
        dn_meta = outputs["dn_meta"]
        device = outputs["pred_logits"].device
        num_dn_boxes = normaliser(0 if dn_meta is None else len(dn_meta["target_labels"]), device)
        suffixes = [""] + [f"_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
        if dn_meta is None:
            zero = outputs["pred_logits"].new_zeros(())
            return {key + suffix: zero for suffix in suffixes for key in DN_LOSS_KEYS}
        dn_outputs = outputs["dn_outputs"]
        layers = [dn_outputs] + list(dn_outputs.get("aux_outputs", []))
        if len(layers) != len(suffixes):
            raise ValueError(f"dn_outputs has {len(layers)} decoder layers but the matching outputs "
                             f"{len(suffixes)}")
        losses = {}
        for layer_outputs, suffix in zip(layers, suffixes):
            terms = dn_loss_terms(layer_outputs["pred_logits"], layer_outputs["pred_boxes"], dn_meta,
                                  num_dn_boxes, self.focal_alpha, self.focal_gamma)
            losses.update({key + suffix: value for key, value in terms.items()})
        return losses

    def forward(self, outputs, targets):
        num_boxes = normaliser(sum(len(t["labels"]) for t in targets), outputs["pred_logits"].device)
        # (predictions, targets, key suffix) of every prediction set that is matched on its own.
        sets = [({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, targets, "")]
        sets += [(aux, targets, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            binary_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            sets.append((outputs["enc_outputs"], binary_targets, "_enc"))
        if "interm_outputs" in outputs:
            sets.append((outputs["interm_outputs"], targets, "_interm"))
        all_indices = self.matcher.match_sets([(predictions, set_targets) for predictions, set_targets, _ in sets],
                                              device=outputs["pred_logits"].device)
        losses = {}
        for (predictions, set_targets, suffix), indices in zip(sets, all_indices):
            losses.update(self.matched_losses(predictions, set_targets, indices, num_boxes, suffix, log=suffix == ""))
        if "dn_meta" in outputs:
            losses.update(self.dn_losses(outputs))
        return losses


def build_weight_dict(cfg):
    """Loss coefficients for the last layer, every aux layer, the two-stage encoder and, with
    ``dn.enabled``, the DN losses of every layer (the same coefficients as the matched ones)."""
    loss_cfg, model_cfg = cfg.loss, cfg.model
    coefficients = (loss_cfg.cls_loss_coef, loss_cfg.bbox_loss_coef, loss_cfg.giou_loss_coef)
    aux_suffixes = [f"_{i}" for i in range(model_cfg.dec_layers - 1)] if model_cfg.aux_loss else []
    # The order is the order of the weighted sum: matched terms, then DN terms, layer by layer.
    encoder_suffix = "_interm" if model_cfg.query_type == "dino" else "_enc"
    suffixes = [""] + aux_suffixes + ([encoder_suffix] if model_cfg.two_stage else [])
    weight_dict = {key + suffix: value for suffix in suffixes for key, value in zip(BASE_LOSS_KEYS, coefficients)}
    if cfg.dn.enabled:
        weight_dict.update({key + suffix: value for suffix in [""] + aux_suffixes
                            for key, value in zip(DN_LOSS_KEYS, coefficients)})
    return weight_dict


def build_criterion(cfg, num_classes, matcher):
    return SetCriterion(num_classes, matcher, build_weight_dict(cfg), focal_alpha=cfg.loss.focal_alpha,
                        focal_gamma=cfg.loss.focal_gamma)
