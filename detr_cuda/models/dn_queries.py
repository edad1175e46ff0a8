"""Denoising (DN) queries: noised ground truth as extra decoder queries (their losses are in criterion.py).

DN-DETR (Li et al. 2022) feeds the decoder, during training only, noised
copies of the ground truth next to the ordinary matching queries and asks it
to reconstruct the clean boxes and labels with fixed one-to-one targets (no
Hungarian matching). DINO's contrastive variant adds negative copies with
larger noise whose target is "no object".

Query layout per image while training with DN (P = num_groups * group_size):

    [ group 0 | group 1 | ... | group G-1 | matching queries (num_queries) ]

    plain DN:     group_size = single_pad; GT j of the image sits at slot j of
                  every group, slots j >= n_b (the image's GT count) are padding.
    contrastive:  group_size = 2 * single_pad; positives at slot j, negatives at
                  slot single_pad + j.

single_pad is the largest GT count in the batch. A batch without any object
has no DN part at all (``prepare_dn_queries`` returns None).

Two deliberate differences from the original code (our choices; the spec
and anchors-code.md do not ask for them): noised boxes are clipped to the
image as boxes (xyxy), so a noised box never leaves the image (the original
clamps cx, cy, w, h separately, which can leave a box partly outside), and
padded slots are masked as attention keys (the original lets DN queries
attend to the all-zero padding of their own group, so an image's DN queries
depend on the largest GT count in its batch).
"""
import torch

from ..util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

# Smallest width / height a noised box may have (normalised units), so heavy
# (negative) noise never produces a degenerate box that GIoU rejects.
MIN_BOX_SIZE = 1e-4


def apply_label_noise(labels, ratio, num_classes, generator=None):
    """Replaces each label, with probability ``ratio``, by a uniform class in [0, num_classes).

    The replacement may equal the original label (as in DN-DETR), so the rate
    of labels that actually change is ratio * (1 - 1 / num_classes).

    Args:
        labels: (N,) int64.
    Returns:
        (noised_labels (N,) int64, replaced (N,) bool).
    """
    replaced = torch.rand(labels.shape, generator=generator, device=labels.device) < ratio
    random_labels = torch.randint(0, num_classes, labels.shape, generator=generator,
                                  device=labels.device, dtype=labels.dtype)
    return torch.where(replaced, random_labels, labels), replaced


def clip_boxes_to_image(boxes):
    """(N, 4) cxcywh -> (N, 4) cxcywh whose xyxy corners lie in [0, 1].

    Crossed corners (possible only for noise scales >= 0.5) are reordered, and
    width / height are kept >= MIN_BOX_SIZE with the box shifted back inside.
    """
    xyxy = box_cxcywh_to_xyxy(boxes).clamp(0.0, 1.0)
    low = torch.minimum(xyxy[:, :2], xyxy[:, 2:])
    high = torch.maximum(xyxy[:, :2], xyxy[:, 2:])
    size = (high - low).clamp(min=MIN_BOX_SIZE)
    centre = torch.minimum(torch.maximum((low + high) / 2, size / 2), 1.0 - size / 2)
    return torch.cat([centre, size], dim=-1)


def apply_box_noise(boxes, scale, generator=None):
    """DN-DETR box noise on (N, 4) cxcywh boxes in [0, 1].

    Centre moved by U(-1, 1) * scale * (w/2, h/2); width and height multiplied
    by 1 + U(-1, 1) * scale; then clipped to the image as a box. For a GT box
    inside the image the clipped box still has its centre within scale*w/2
    (x) and scale*h/2 (y) of the original and its size within (1 +- scale).
    """
    noise = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype) * 2 - 1
    size = boxes[:, 2:]
    centre = boxes[:, :2] + noise[:, :2] * size * (scale / 2)
    size = size * (1 + noise[:, 2:] * scale)
    return clip_boxes_to_image(torch.cat([centre, size], dim=-1))


def apply_corner_noise(boxes, low, high, generator=None):
    """DINO box noise: each xyxy corner coordinate moves by m * (w/2 or h/2).

    m is uniform in [low, high) with a random sign, drawn per coordinate, so
    the centre moves by at most high*w/2 and the size changes by at most
    high*w (likewise for y / h). Positives use [0, scale), negatives
    [scale, 2*scale). Returns clipped (N, 4) cxcywh boxes.
    """
    shape, kwargs = boxes.shape, dict(generator=generator, device=boxes.device)
    magnitude = low + (high - low) * torch.rand(shape, dtype=boxes.dtype, **kwargs)
    sign = torch.randint(0, 2, shape, **kwargs).to(boxes.dtype) * 2 - 1
    half_size = boxes[:, 2:].repeat(1, 2) / 2
    xyxy = box_cxcywh_to_xyxy(boxes) + sign * magnitude * half_size
    return clip_boxes_to_image(box_xyxy_to_cxcywh(xyxy))


def dn_group_layout(gt_counts, dn_cfg):
    """Sizes of the DN block for a batch with ``gt_counts`` objects per image.

    Returns (single_pad, group_size, num_groups); num_groups is 0 when the
    batch has no object. ``dn_cfg.max_dn_queries`` > 0 sets the total DN
    query budget: as many groups as fit in it (at least one), as in DINO.
    """
    single_pad = max(gt_counts) if gt_counts else 0
    if single_pad == 0:
        return 0, 0, 0
    group_size = 2 * single_pad if dn_cfg.contrastive else single_pad
    if dn_cfg.max_dn_queries > 0:
        num_groups = max(1, dn_cfg.max_dn_queries // group_size)
    else:
        num_groups = dn_cfg.dn_groups
    return single_pad, group_size, num_groups


def build_dn_attn_mask(gt_counts, single_pad, group_size, num_groups, num_queries, device=None):
    """Self-attention mask for DN queries followed by matching queries (True = blocked).

    Rows are queries, columns keys. Matching queries see no DN query; a DN
    group sees no other group; padded DN slots are blocked as keys for every
    query. DN queries see the matching queries and the real slots of their
    own group.

    Returns:
        (B, P + num_queries, P + num_queries) bool, P = num_groups * group_size.
    """
    num_dn = num_groups * group_size
    total = num_dn + num_queries
    counts = torch.as_tensor(gt_counts, device=device).view(-1, 1)
    slot = torch.arange(num_dn, device=device)
    group = slot // group_size
    real_slot = (slot % group_size % single_pad).view(1, -1) < counts  # (B, P)
    mask = torch.zeros(len(gt_counts), total, total, dtype=torch.bool, device=device)
    mask[:, num_dn:, :num_dn] = True
    mask[:, :num_dn, :num_dn] = (group.view(-1, 1) != group.view(1, -1))
    mask[:, :, :num_dn] |= ~real_slot[:, None, :]
    return mask


def prepare_dn_queries(targets, label_enc, num_classes, num_queries, dn_cfg, generator=None, indicator=True):
    """Noised ground-truth queries for one training batch.

    Args:
        targets: list of B dicts with ``labels`` (N_b,) int64 and ``boxes`` (N_b, 4) cxcywh in [0, 1].
        label_enc: nn.Embedding(num_classes + 1, hidden_dim - 1) with ``indicator`` (DN-DETR: the DN
            indicator 1 is appended), nn.Embedding(num_classes + 1, hidden_dim) without (DINO).
        num_queries: number of matching queries that follow the DN block.
        dn_cfg: DNConfig (dn_groups, label_noise_ratio, box_noise_scale, contrastive, max_dn_queries).
    Returns:
        None when no image in the batch has an object, else a dict:
            ``content`` (B, P, hidden_dim): label embedding (+ indicator 1); zeros at padded slots.
            ``boxes`` (B, P, 4) noised cxcywh boxes in [0, 1]; 0.5 at padded slots.
            ``attn_mask`` (B, P + num_queries, P + num_queries) bool, True = blocked.
            ``dn_meta``: ``num_dn_queries`` P, ``num_groups``, ``single_pad``, ``group_size``,
                ``contrastive``; ``positive_index`` (image index (M,), slot (M,)) of the M positive
                queries, M = num_groups * (GT count of the batch), group-major in the order of the
                batch's GT; ``negative_index`` the same for the negatives (contrastive) or None;
                ``target_labels`` (M,) and ``target_boxes`` (M, 4) their clean targets.
    """
    gt_counts = [len(t["labels"]) for t in targets]
    single_pad, group_size, num_groups = dn_group_layout(gt_counts, dn_cfg)
    if num_groups == 0:
        return None
    device = label_enc.weight.device
    batch_size, num_dn = len(targets), num_groups * group_size
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
    image_index = torch.cat([torch.full((n,), b, dtype=torch.long, device=device)
                             for b, n in enumerate(gt_counts)])
    index_in_image = torch.cat([torch.arange(n, device=device) for n in gt_counts])

    # Group-major repeat of the batch's GT list: one entry per positive DN query.
    group = torch.arange(num_groups, device=device).repeat_interleave(len(labels))
    pos_labels, _ = apply_label_noise(labels.repeat(num_groups), dn_cfg.label_noise_ratio,
                                      num_classes, generator)
    pos_image = image_index.repeat(num_groups)
    pos_slot = group * group_size + index_in_image.repeat(num_groups)
    scale = dn_cfg.box_noise_scale
    if dn_cfg.contrastive:
        pos_boxes = apply_corner_noise(boxes.repeat(num_groups, 1), 0.0, scale, generator)
        neg_boxes = apply_corner_noise(boxes.repeat(num_groups, 1), scale, 2 * scale, generator)
        neg_labels, _ = apply_label_noise(labels.repeat(num_groups), dn_cfg.label_noise_ratio,
                                          num_classes, generator)
        all_image = torch.cat([pos_image, pos_image])
        all_slot = torch.cat([pos_slot, pos_slot + single_pad])
        all_labels = torch.cat([pos_labels, neg_labels])
        all_boxes = torch.cat([pos_boxes, neg_boxes])
    else:
        pos_boxes = apply_box_noise(boxes.repeat(num_groups, 1), scale, generator)
        all_image, all_slot, all_labels, all_boxes = pos_image, pos_slot, pos_labels, pos_boxes

    embedded = label_enc(all_labels)
    if indicator:
        embedded = torch.cat([embedded, embedded.new_ones(len(embedded), 1)], dim=-1)
    content = embedded.new_zeros(batch_size, num_dn, embedded.shape[-1])
    content = content.index_put((all_image, all_slot), embedded)
    dn_boxes = all_boxes.new_full((batch_size, num_dn, 4), 0.5)
    dn_boxes[all_image, all_slot] = all_boxes
    attn_mask = build_dn_attn_mask(gt_counts, single_pad, group_size, num_groups, num_queries, device)
    dn_meta = {
        "num_dn_queries": num_dn, "num_groups": num_groups, "single_pad": single_pad,
        "group_size": group_size, "contrastive": bool(dn_cfg.contrastive),
        "positive_index": (pos_image, pos_slot),
        "negative_index": (pos_image, pos_slot + single_pad) if dn_cfg.contrastive else None,
        "target_labels": labels.repeat(num_groups),
        "target_boxes": boxes.repeat(num_groups, 1),
    }
    return {"content": content, "boxes": dn_boxes, "attn_mask": attn_mask, "dn_meta": dn_meta}


def split_dn_outputs(tensor, num_dn_queries):
    """(..., P + Q, C) -> (DN part (..., P, C), matching part (..., Q, C)) along the query dim (-2)."""
    return tensor[..., :num_dn_queries, :], tensor[..., num_dn_queries:, :]
