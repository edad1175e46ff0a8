"""DN query construction: attention mask, noise bounds, layout, empty images."""
import pytest
import torch
from torch import nn

from detr_cuda.config import DNConfig
from detr_cuda.models.criterion import dn_loss_terms
from detr_cuda.models.dn_queries import (apply_box_noise, apply_corner_noise, apply_label_noise, build_dn_attn_mask,
                                         dn_group_layout, prepare_dn_queries)


def random_targets(counts, num_classes, generator):
    targets = []
    for n in counts:
        size = 0.05 + 0.9 * torch.rand(n, 2, generator=generator)
        centre = size / 2 + (1 - size) * torch.rand(n, 2, generator=generator)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=generator),
                        "boxes": torch.cat([centre, size], dim=1)})
    return targets


def expected_mask(gt_counts, num_groups, contrastive, num_queries):
    """The blocked pairs written out one by one from the rules."""
    single_pad = max(gt_counts)
    group_size = 2 * single_pad if contrastive else single_pad
    num_dn = num_groups * group_size
    total = num_dn + num_queries
    mask = torch.zeros(len(gt_counts), total, total, dtype=torch.bool)
    for b, n in enumerate(gt_counts):
        for row in range(total):
            for col in range(total):
                row_is_dn, col_is_dn = row < num_dn, col < num_dn
                if not col_is_dn:
                    continue  # everybody sees the matching queries
                if not row_is_dn:
                    mask[b, row, col] = True  # matching query looking at a DN query
                    continue
                if row // group_size != col // group_size:
                    mask[b, row, col] = True  # another DN group
                    continue
                slot = col % group_size
                gt_index = slot - single_pad if slot >= single_pad else slot
                if gt_index >= n:
                    mask[b, row, col] = True  # padded slot of this image
    return mask


@pytest.mark.parametrize("contrastive", [False, True])
def test_attn_mask_matches_rules_element_by_element(contrastive):
    gt_counts, num_groups, num_queries = [3, 0, 1, 2], 3, 5
    single_pad = max(gt_counts)
    group_size = 2 * single_pad if contrastive else single_pad
    mask = build_dn_attn_mask(gt_counts, single_pad, group_size, num_groups, num_queries)
    expected = expected_mask(gt_counts, num_groups, contrastive, num_queries)
    total = num_groups * group_size + num_queries
    assert mask.shape == expected.shape == (4, total, total)
    assert torch.equal(mask, expected)
    # No query is left with nothing to attend to (that would make softmax NaN).
    assert not mask.all(-1).any()


@pytest.mark.parametrize("contrastive", [False, True])
def test_prepare_dn_queries_layout_and_mask(contrastive):
    generator = torch.Generator().manual_seed(0)
    gt_counts, num_classes, hidden, num_queries = [2, 0, 4], 7, 16, 6
    targets = random_targets(gt_counts, num_classes, generator)
    cfg = DNConfig(enabled=True, dn_groups=3, contrastive=contrastive)
    label_enc = nn.Embedding(num_classes + 1, hidden - 1)
    dn = prepare_dn_queries(targets, label_enc, num_classes, num_queries, cfg, generator)
    group_size = 8 if contrastive else 4
    num_dn = 3 * group_size
    meta = dn["dn_meta"]
    assert meta["num_dn_queries"] == num_dn and meta["num_groups"] == 3
    assert dn["content"].shape == (3, num_dn, hidden) and dn["boxes"].shape == (3, num_dn, 4)
    assert torch.equal(dn["attn_mask"], expected_mask(gt_counts, 3, contrastive, num_queries))
    real = torch.zeros(3, num_dn, dtype=torch.bool)
    real[meta["positive_index"]] = True
    if contrastive:
        real[meta["negative_index"]] = True
    # Indicator 1 on every real slot, all-zero content on padding.
    assert torch.equal(dn["content"][..., -1], real.float())
    assert (dn["content"][~real] == 0).all()
    # Positives are group-major copies of the batch GT with clean targets in the same order.
    clean = torch.cat([t["boxes"] for t in targets]).repeat(3, 1)
    assert torch.equal(meta["target_boxes"], clean)
    assert torch.equal(meta["target_labels"], torch.cat([t["labels"] for t in targets]).repeat(3))
    pos_image, pos_slot = meta["positive_index"]
    assert pos_image.tolist() == [0, 0, 2, 2, 2, 2] * 3
    assert pos_slot.tolist() == [g * group_size + j for g in range(3) for j in (0, 1, 0, 1, 2, 3)]


def test_batch_without_objects_gives_no_dn_queries():
    cfg = DNConfig(enabled=True)
    label_enc = nn.Embedding(4, 7)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert prepare_dn_queries(targets, label_enc, 3, 10, cfg) is None
    assert dn_group_layout([0, 0], cfg) == (0, 0, 0)


def test_query_budget_sets_the_number_of_groups():
    cfg = DNConfig(enabled=True, contrastive=True, max_dn_queries=100)
    assert dn_group_layout([3, 7], cfg) == (7, 14, 7)
    assert dn_group_layout([80], cfg) == (80, 160, 1)  # at least one group
    cfg = DNConfig(enabled=True, dn_groups=5)
    assert dn_group_layout([3, 7], cfg) == (7, 7, 5)


def test_box_noise_bounds_over_many_draws():
    generator = torch.Generator().manual_seed(1)
    boxes = torch.cat([t["boxes"] for t in random_targets([20000], 3, generator)])
    # Boxes touching the image border stress the clipping.
    boxes[:2000, 0] = boxes[:2000, 2] / 2
    boxes[2000:4000, 1] = 1 - boxes[2000:4000, 3] / 2
    scale = 0.4
    noised = apply_box_noise(boxes, scale, generator)
    xyxy = torch.cat([noised[:, :2] - noised[:, 2:] / 2, noised[:, :2] + noised[:, 2:] / 2], 1)
    eps = 1e-5
    assert (noised >= 0).all() and (noised <= 1).all()
    assert (xyxy >= -eps).all() and (xyxy <= 1 + eps).all()  # never leaves the image
    shift = (noised[:, :2] - boxes[:, :2]).abs()
    assert (shift <= boxes[:, 2:] * scale / 2 + eps).all()
    ratio = noised[:, 2:] / boxes[:, 2:]
    assert (ratio >= 1 - scale - eps).all() and (ratio <= 1 + scale + eps).all()
    # The noise really uses its range (not a no-op), on boxes away from the border.
    inner = slice(4000, None)
    assert (shift[inner] / boxes[inner, 2:]).max() > 0.95 * scale / 2
    assert ratio[inner].max() > 1 + 0.95 * scale and ratio[inner].min() < 1 - 0.95 * scale


def test_corner_noise_positive_and_negative_ranges():
    generator = torch.Generator().manual_seed(2)
    boxes = torch.cat([t["boxes"] for t in random_targets([20000], 3, generator)])
    # Small boxes well inside the image, so clipping never interferes with the ranges.
    boxes = boxes * torch.tensor([0.5, 0.5, 0.25, 0.25]) + torch.tensor([0.25, 0.25, 0.0, 0.0])
    scale, eps = 0.4, 1e-5
    for low, high in [(0.0, scale), (scale, 2 * scale)]:
        noised = apply_corner_noise(boxes, low, high, generator)
        assert (noised >= 0).all() and (noised <= 1).all()
        moved = (box_corners(noised) - box_corners(boxes)).abs() / boxes[:, 2:].repeat(1, 2) * 2
        assert (moved >= low - eps).all() and (moved <= high + eps).all()
        assert (noised[:, :2] - boxes[:, :2]).abs().le(boxes[:, 2:] * high / 2 + eps).all()


def box_corners(boxes):
    return torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)


def test_label_noise_rate():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (50000,), generator=generator)
    noised, replaced = apply_label_noise(labels, 0.2, 10, generator)
    assert abs(replaced.float().mean().item() - 0.2) < 0.01
    # A replacement is uniform over the classes, so it keeps the label 1 time in 10.
    assert abs((noised != labels).float().mean().item() - 0.2 * 0.9) < 0.01
    assert torch.equal(noised[~replaced], labels[~replaced])
    assert noised.min() >= 0 and noised.max() < 10
    same, replaced = apply_label_noise(labels, 0.0, 10, generator)
    assert torch.equal(same, labels) and not replaced.any()


@pytest.mark.parametrize("contrastive", [False, True])
def test_dn_loss_terms_follow_the_fixed_one_to_one_targets(contrastive):
    generator = torch.Generator().manual_seed(4)
    targets = random_targets([2, 1], 3, generator)
    cfg = DNConfig(enabled=True, dn_groups=2, contrastive=contrastive)
    dn = prepare_dn_queries(targets, nn.Embedding(4, 7), 3, 5, cfg, generator)
    meta = dn["dn_meta"]
    num_dn = meta["num_dn_queries"]
    pos = meta["positive_index"]
    # Perfect positives: the clean box and a confident correct class; every other slot says "no object".
    logits = torch.full((2, num_dn, 3), -30.0)
    logits[pos[0], pos[1], meta["target_labels"]] = 30.0
    boxes = torch.full((2, num_dn, 4), 0.5)
    boxes[pos] = meta["target_boxes"]
    perfect = dn_loss_terms(logits, boxes, meta, num_dn_boxes=6.0)
    assert all(value.item() < 1e-6 for value in perfect.values()), perfect
    # Shifting every positive box by 0.01 in cx costs 0.01 per query, summed and normalised.
    shifted = boxes.clone()
    shifted[pos[0], pos[1], 0] += 0.01
    terms = dn_loss_terms(logits, shifted, meta, num_dn_boxes=6.0)
    assert terms["loss_dn_bbox"].item() == pytest.approx(0.01 * len(pos[0]) / 6.0, rel=1e-4)
    # Padded slots are never supervised; contrastive negatives must say "no object".
    padded = torch.ones(2, num_dn, dtype=torch.bool)
    padded[pos] = False
    if contrastive:
        padded[meta["negative_index"]] = False
    confused = logits.clone()
    confused[padded] = 30.0
    assert dn_loss_terms(confused, boxes, meta, 6.0)["loss_dn_ce"].item() < 1e-6
    if contrastive:
        confused[meta["negative_index"]] = 30.0
        assert dn_loss_terms(confused, boxes, meta, 6.0)["loss_dn_ce"].item() > 1.0
