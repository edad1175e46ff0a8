"""Hungarian matcher optimality, empty targets, loss values and zero-object safety."""
import itertools
import math

import pytest
import torch

from detr_cuda.models import build_model
from detr_cuda.models.criterion import SetCriterion, normaliser, sigmoid_focal_loss
from detr_cuda.models.matcher import HungarianMatcher
from detr_cuda.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from tests.support.configs import VARIANTS, tiny_model_config
from tests.support.models import padded_batch, random_targets, total_loss


def random_outputs(batch, queries, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(batch, queries, classes, generator=generator),
            "pred_boxes": torch.cat([torch.rand(batch, queries, 2, generator=generator) * 0.8 + 0.1,
                                     torch.rand(batch, queries, 2, generator=generator) * 0.4 + 0.05], -1)}


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_against_brute_force(seed):
    matcher = HungarianMatcher()
    queries, classes = 5, 3
    counts = [seed % 4 + 1, 3, 0]
    outputs = random_outputs(len(counts), queries, classes, seed)
    targets = random_targets(counts, classes, seed)
    indices = matcher(outputs, targets)
    for image, (target, (query_index, target_index)) in enumerate(zip(targets, indices)):
        n = len(target["boxes"])
        assert len(query_index) == len(target_index) == min(n, queries)
        if n == 0:
            continue
        cost = matcher.cost_matrix(outputs["pred_logits"][image], outputs["pred_boxes"][image],
                                   target["labels"], target["boxes"])
        assert sorted(target_index.tolist()) == list(range(n))
        assert len(set(query_index.tolist())) == n
        found = cost[query_index, target_index].sum().item()
        best = min(sum(cost[q, t].item() for t, q in enumerate(perm))
                   for perm in itertools.permutations(range(queries), n))
        assert found == pytest.approx(best, abs=1e-5)


def test_matcher_cost_terms():
    """Class cost is the focal difference; box terms are L1 and -GIoU, weighted 2 / 5 / 2."""
    matcher = HungarianMatcher()
    logits = torch.tensor([[0.3, -1.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    target_boxes = torch.tensor([[0.55, 0.5, 0.2, 0.3]])
    p = torch.sigmoid(torch.tensor(-1.0))
    focal = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
    l1 = 0.05 + 0.1
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))[0, 0]
    expected = 2 * focal + 5 * l1 - 2 * giou
    assert matcher.cost_matrix(logits, boxes, torch.tensor([1]), target_boxes)[0, 0].item() == \
        pytest.approx(expected.item(), abs=1e-5)


def test_matcher_empty_targets():
    matcher = HungarianMatcher()
    outputs = random_outputs(2, 4, 3, 0)
    indices = matcher(outputs, random_targets([0, 0], 3))
    assert all(len(q) == 0 and len(t) == 0 and q.dtype == torch.int64 for q, t in indices)


def test_matcher_matches_several_sets_as_one_by_one_and_survives_non_finite_predictions():
    matcher = HungarianMatcher()
    sets = [(random_outputs(2, 5, 3, seed), random_targets(counts, 3, seed=seed))
            for seed, counts in ((0, [2, 1]), (1, [0, 0]), (2, [3, 0]))]
    together = matcher.match_sets(sets)
    for (outputs, targets), indices in zip(sets, together):
        for (q, t), (q1, t1) in zip(indices, matcher(outputs, targets)):
            assert torch.equal(q, q1) and torch.equal(t, t1)
    # NaN predictions (a diverged model) are matched anyway; their loss is non-finite, which the
    # training loop's check of the total loss catches (the matcher itself costs no host sync for it).
    outputs, targets = sets[0]
    outputs["pred_logits"][0, 1] = float("nan")
    outputs["pred_boxes"][1, 2] = float("inf")
    indices = matcher(outputs, targets)
    assert [len(q) for q, _ in indices] == [2, 1]
    losses = SetCriterion(3, matcher, {})(outputs, targets)
    assert not all(torch.isfinite(v) for v in losses.values())


def test_giou_of_identical_boxes_is_one():
    boxes = box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.7, 0.1, 0.05]]))
    assert torch.allclose(torch.diag(generalized_box_iou(boxes, boxes)), torch.ones(2))


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([[[2.0, -1.0]]])
    targets = torch.tensor([[[1.0, 0.0]]])
    p = torch.sigmoid(logits)[0, 0]
    expected = (0.25 * (1 - p[0]) ** 2 * -torch.log(p[0]) + 0.75 * p[1] ** 2 * -torch.log(1 - p[1])) / 2
    assert sigmoid_focal_loss(logits, targets, num_boxes=2).item() == pytest.approx(expected.item(), rel=1e-5)


def make_criterion(num_classes=3):
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return SetCriterion(num_classes, HungarianMatcher(), weights)


def test_perfect_boxes_have_zero_box_losses():
    criterion = make_criterion()
    targets = random_targets([2], 3, seed=1)
    outputs = {"pred_logits": torch.full((1, 4, 3), -10.0), "pred_boxes": torch.full((1, 4, 4), 0.3)}
    outputs["pred_boxes"][0, 1] = targets[0]["boxes"][0]
    outputs["pred_boxes"][0, 3] = targets[0]["boxes"][1]
    outputs["pred_logits"][0, 1, targets[0]["labels"][0]] = 10.0
    outputs["pred_logits"][0, 3, targets[0]["labels"][1]] = 10.0
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_ce"].item() < 1e-4
    assert losses["class_error"].item() == 0.0


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_losses_are_finite_and_zero_object_safe(variant):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_model_config(*VARIANTS[variant]), 4)
    images, mask = padded_batch([(64, 96), (80, 64)])
    for counts in ([2, 0], [0, 0]):
        model.zero_grad()
        outputs = model(images, mask)
        losses = criterion(outputs, random_targets(counts, 4))
        expected_keys = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
        if variant == "two_stage":
            expected_keys |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
        assert expected_keys <= set(losses)
        assert set(criterion.weight_dict) == expected_keys
        assert all(torch.isfinite(v) for v in losses.values())
        if counts == [0, 0]:
            assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
            assert losses["loss_ce"].item() > 0  # every query is pushed towards "no object"
        loss = total_loss(criterion, losses)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_num_boxes_normalisation():
    assert normaliser(sum(len(t["labels"]) for t in random_targets([3, 2], 3)), "cpu") == 5.0
    assert normaliser(sum(len(t["labels"]) for t in random_targets([0], 3)), "cpu") == 1.0


def test_two_stage_encoder_loss_is_class_agnostic():
    criterion = SetCriterion(3, HungarianMatcher(), {})
    targets = random_targets([2], 3, seed=3)
    targets[0]["labels"] = torch.tensor([2, 1])
    outputs = random_outputs(1, 4, 3, 0)
    enc = random_outputs(1, 6, 3, 1)
    losses = criterion({**outputs, "enc_outputs": enc}, targets)
    binary = [dict(targets[0], labels=torch.zeros(2, dtype=torch.int64))]
    num_boxes = 2.0
    expected = criterion.matched_losses(enc, binary, criterion.matcher(enc, binary), num_boxes)
    assert losses["loss_ce_enc"].item() == pytest.approx(expected["loss_ce"].item())
    assert losses["loss_giou_enc"].item() == pytest.approx(expected["loss_giou"].item())
    assert math.isfinite(losses["loss_bbox_enc"].item())
