import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support.paths import coco128_dir
from detr_cuda.config import DataConfig, load_config
from detr_cuda.data import CocoDetection, build_dataloader, build_dataset, build_transforms
from detr_cuda.data.coco_eval import (CocoEvaluator, arrays_to_coco_results, detection_to_array, evaluate_coco,
                                     format_metrics)
from detr_cuda.data.synthetic import generate_synthetic_coco
from detr_cuda.util.box_ops import box_cxcywh_to_xyxy


def targets_as_detections(targets):
    """Ground truth -> detections as the postprocessor returns them: absolute xyxy in the original size."""
    detections = []
    for target in targets:
        height, width = target["orig_size"].tolist()
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])
        detections.append({"scores": torch.ones(len(boxes)), "labels": target["labels"], "boxes": boxes})
    return detections


def imperfect_detections(targets):
    """Ground truth shifted by 2 px with falling scores: AP strictly between 0 and 1, so a detection
    counted twice (an image evaluated twice) changes it."""
    return [{**d, "boxes": d["boxes"] + 2.0, "scores": torch.linspace(1, 0.5, len(d["boxes"]))}
            for d in targets_as_detections(targets)]


def run_evaluation(dataset, batch_size, repeat=1, distributed=False):
    evaluator = CocoEvaluator(dataset.load_coco_gt(), dataset.label_to_category_id)
    loader = build_dataloader(dataset, batch_size=batch_size, train=False, distributed=distributed)
    for _ in range(repeat):
        for _, _, targets in loader:
            evaluator.update([t["image_id"] for t in targets], imperfect_detections(targets))
    return evaluator.evaluate()


@pytest.fixture(scope="module")
def coco128_val():
    """(dataset, target batches): coco128 through the evaluation loader, read once for this module."""
    root = coco128_dir()
    # Evaluation transforms at a small size: the boxes make a full round trip through resize and normalisation.
    transforms = build_transforms(DataConfig(val_short_side=256, val_max_size=400), train=False)
    dataset = CocoDetection(os.path.join(root, "images"), os.path.join(root, "annotations.json"), transforms)
    batches = [targets for _, _, targets in build_dataloader(dataset, batch_size=4, train=False)]
    return dataset, batches


def evaluate_batches(dataset, batches, output_dir=None, drop_label=None):
    evaluator = CocoEvaluator(dataset.load_coco_gt(), dataset.label_to_category_id)
    for targets in batches:
        detections = targets_as_detections(targets)
        if drop_label is not None:
            detections = [{k: v[d["labels"] != drop_label] for k, v in d.items()} for d in detections]
        evaluator.update([t["image_id"] for t in targets], detections)
    return evaluator.evaluate(output_dir=output_dir)


def test_ground_truth_as_detections_gives_ap_1_on_coco128(coco128_val, tmp_path):
    metrics = evaluate_batches(*coco128_val, output_dir=tmp_path)
    assert metrics["metrics"]["AP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["metrics"]["AP50"] == pytest.approx(1.0) and metrics["metrics"]["AP75"] == pytest.approx(1.0)
    assert metrics["num_images"] == 128 and metrics["num_detections"] == 929  # 939 minus 10 crowd
    rows = {row["category_id"]: row for row in metrics["per_class"]}
    assert len(rows) == 80 and sum(r["AP"] is not None for r in rows.values()) == 71
    assert rows[1]["name"] == "person" and rows[1]["AP"] == pytest.approx(1.0)
    with open(tmp_path / "eval.json") as handle:
        written = json.load(handle)
    assert written["metrics"] == metrics["metrics"] and len(written["coco_stats"]) == 12
    with open(tmp_path / "detections.json") as handle:
        detections = json.load(handle)
    # exactly the COCO results format: nothing pycocotools' loadRes adds (segmentation, area, id, iscrowd)
    assert len(detections) == 929 and all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    assert {d["category_id"] for d in detections} <= {c for c in rows}  # written in the dataset's own ids
    assert "person" in format_metrics(metrics)


def test_missing_class_lowers_only_that_class(coco128_val):
    person = coco128_val[0].category_id_to_label[1]
    metrics = evaluate_batches(*coco128_val, drop_label=person)
    rows = {row["category_id"]: row for row in metrics["per_class"]}
    assert rows[1]["AP"] == 0.0 and rows[2]["AP"] in (None, pytest.approx(1.0))
    assert metrics["metrics"]["AP"] == pytest.approx(70 / 71, abs=1e-6)


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    paths = generate_synthetic_coco(tmp_path_factory.mktemp("syn"), num_images=9, image_size=64, seed=3)
    transforms = build_transforms(DataConfig(val_short_side=48, val_max_size=64), train=False)
    return CocoDetection(paths["images"], paths["annotations"], transforms)


def test_duplicates_and_batch_size_do_not_change_ap(synthetic_val):
    evaluator = CocoEvaluator(synthetic_val.load_coco_gt(), synthetic_val.label_to_category_id)
    loader = build_dataloader(synthetic_val, batch_size=2, train=False)
    for images, _, targets in loader:
        detections = imperfect_detections(targets)
        evaluator.update([t["image_id"] for t in targets], detections)
        evaluator.update([t["image_id"] for t in targets], detections)  # as the sampler's padding would
    once = evaluator.evaluate()
    assert once["num_detections"] == sum(len(t["labels"]) for _, _, ts in loader for t in ts)
    assert 0 < once["metrics"]["AP"] < 1

    twice = run_evaluation(synthetic_val, batch_size=3, repeat=2)
    single = run_evaluation(synthetic_val, batch_size=1)
    assert twice["coco_stats"] == single["coco_stats"] == once["coco_stats"]

    # Without the de-duplication the repeats would be false positives: check that this test can fail.
    coco_gt = synthetic_val.load_coco_gt()
    results = [r for _, _, targets in loader for t, d in zip(targets, imperfect_detections(targets))
               for r in arrays_to_coco_results({int(t["image_id"]): detection_to_array(
                   int(t["image_id"]), d, synthetic_val.label_to_category_id)})]
    doubled = evaluate_coco(coco_gt, results + results, synthetic_val.image_ids.tolist())
    assert doubled["metrics"]["AP"] < once["metrics"]["AP"]


def test_class_names_and_rows_that_name_no_category(synthetic_val):
    loader = build_dataloader(synthetic_val, batch_size=4, train=False)
    names = ["disc", "box", "tri", "plus"]
    evaluator = CocoEvaluator(synthetic_val.load_coco_gt(), synthetic_val.label_to_category_id, names)
    for _, _, targets in loader:
        evaluator.update([t["image_id"] for t in targets], imperfect_detections(targets))
    result = evaluator.evaluate()
    assert result["coco_stats"] == run_evaluation(synthetic_val, batch_size=2)["coco_stats"]
    assert [row["name"] for row in result["per_class"]] == names
    assert "plus" in format_metrics(result)
    # A model row that names no category (the official COCO heads' unused ids) is dropped, not scored.
    detection = {"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1]),
                 "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0]])}
    rows = detection_to_array(7, detection, [None, 3])
    assert rows.tolist() == [[1.0, 1.0, 4.0, 4.0, 0.800000011920929, 3.0]]


def test_no_detections_at_all_gives_zero_ap(synthetic_val, tmp_path):
    evaluator = CocoEvaluator(synthetic_val.load_coco_gt(), synthetic_val.label_to_category_id)
    for index in range(len(synthetic_val)):
        empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
        evaluator.update([int(synthetic_val.image_ids[index])], [empty])
    metrics = evaluator.evaluate(output_dir=tmp_path)
    assert metrics["metrics"]["AP"] == 0.0 and metrics["metrics"]["AP50"] == 0.0
    assert metrics["num_detections"] == 0
    assert os.path.isfile(tmp_path / "eval.json")


def test_label_outside_the_map_is_a_clear_error(synthetic_val):
    evaluator = CocoEvaluator(synthetic_val.load_coco_gt(), synthetic_val.label_to_category_id)
    bad = {"scores": torch.ones(1), "labels": torch.tensor([4]), "boxes": torch.tensor([[0.0, 0, 5, 5]])}
    with pytest.raises(ValueError, match="label 4 outside the category map of 4"):
        evaluator.update([1], [bad])


def _synthetic_cfg(folder):
    return load_config(None, ["data.dataset=synthetic", f"data.synthetic_dir={folder}", "data.synthetic_val_images=9",
                              "data.synthetic_image_size=64", "data.val_short_side=48", "data.val_max_size=64"])


def _distributed_worker(rank, world_size, port, folder, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # rank 0 generates the set and validates it, rank 1 waits and receives the report
        dataset = build_dataset(_synthetic_cfg(folder), "val")
        metrics = run_evaluation(dataset, batch_size=2, distributed=True)
        queue.put((rank, metrics["coco_stats"], metrics["num_images"], dataset.report.ok))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_same_ap_as_one(tmp_path):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_distributed_worker, args=(2, port, str(tmp_path), queue), nprocs=2, join=True,
                       start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(2))
    dataset = build_dataset(_synthetic_cfg(tmp_path), "val")  # the set the ranks generated
    single = run_evaluation(dataset, batch_size=3)
    assert 0 < single["metrics"]["AP"] < 1
    for _, stats, num_images, report_ok in results:  # 9 images over 2 ranks: the sampler repeats one
        assert num_images == 9 and stats == single["coco_stats"] and report_ok
