"""Pictures of an evaluation: per-class AP bar chart and precision-recall curves, next to eval.json.

matplotlib is an optional extra (``pip install matplotlib``): without it the
plots are skipped with one message saying how to install it.

Hook for tools/eval.py, after ``metrics = evaluator.evaluate(output_dir)``::

    from detr_cuda.inference.eval_plots import write_eval_plots
    write_eval_plots(os.path.join(output_dir, "eval.json"), coco_gt=evaluator.coco_gt)

The precision-recall curves need pycocotools' precision table: pass a
``COCOeval`` that has run ``accumulate()``, or ``coco_gt`` (a pycocotools COCO
or an instances JSON path) so the detections.json beside eval.json is
evaluated again. The bar chart needs only eval.json's ``per_class`` entries.
"""
import contextlib
import io
import json
import os
import sys

import numpy as np

INSTALL_HINT = "pip install matplotlib"
AP_BARS_FILE = "per_class_ap.png"
PR_CURVE_FILE = "pr_curve.png"


def _matplotlib():
    """The pyplot module with the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def precision_table(coco_gt, detections, image_ids=None):
    """pycocotools bbox evaluation -> (precision (T, R, K, A, M), category ids (K,), {id: name}).

    coco_gt: pycocotools COCO or instances JSON path; detections: COCO results list or path.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    silent = io.StringIO()
    with contextlib.redirect_stdout(silent):
        if isinstance(coco_gt, (str, os.PathLike)):
            coco_gt = COCO(str(coco_gt))
        if isinstance(detections, (str, os.PathLike)):
            with open(detections) as handle:
                detections = json.load(handle)
        if not detections:
            raise ValueError("no detections: nothing to draw a precision-recall curve from")
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        else:
            coco_eval.params.imgIds = sorted({int(d["image_id"]) for d in detections})
        coco_eval.evaluate()
        coco_eval.accumulate()
    return _from_coco_eval(coco_eval)


def _from_coco_eval(coco_eval):
    names = {c["id"]: c.get("name", str(c["id"])) for c in coco_eval.cocoGt.dataset["categories"]}
    return coco_eval.eval["precision"], list(coco_eval.params.catIds), names


def plot_per_class_ap(per_class, path, plt):
    """Horizontal bars of AP (IoU .50:.95) and AP50 per class, best first; classes without ground
    truth (AP None) are left out. per_class: eval.json's list of {name, category_id, AP, AP50}."""
    rows = sorted((row for row in per_class if row.get("AP") is not None), key=lambda row: row["AP"])
    if not rows:
        raise ValueError("no class has an AP (no ground truth in the evaluated images?)")
    names = [f"{row['name']} ({row['category_id']})" for row in rows]
    positions = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(8, max(3.0, 0.25 * len(rows) + 1.2)))
    axis.barh(positions + 0.2, [row.get("AP50") or 0.0 for row in rows], height=0.4, label="AP50",
              color="#9ecae1")
    axis.barh(positions - 0.2, [row["AP"] for row in rows], height=0.4, label="AP .50:.95", color="#3182bd")
    axis.set_yticks(positions)
    axis.set_yticklabels(names, fontsize=7 if len(rows) > 30 else 9)
    axis.set_xlim(0, 1)
    axis.set_xlabel("average precision")
    axis.set_title(f"per-class AP ({len(rows)} classes with ground truth)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pr_curves(precision, category_ids, names, path, plt, max_classes=10):
    """Precision-recall curves (area all, 100 detections): the mean over classes at IoU 0.50, 0.75
    and 0.50:0.95, and at IoU 0.50 the ``max_classes`` classes with the highest AP50."""
    recall = np.linspace(0.0, 1.0, precision.shape[1])

    def mean_curve(table):  # table (R, K) with -1 where a class has no ground truth
        valid = (table > -1).all(0)
        return table[:, valid].mean(1) if valid.any() else None

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for label, table in (("IoU 0.50", precision[0, :, :, 0, -1]), ("IoU 0.75", precision[5, :, :, 0, -1]),
                         ("IoU 0.50:0.95", precision[:, :, :, 0, -1].mean(0))):
        curve = mean_curve(table)
        if curve is not None:
            left.plot(recall, curve, label=label)
    left.set_title("mean over classes")
    at_50 = precision[0, :, :, 0, -1]
    ap50 = [(float(at_50[:, k].mean()), k) for k in range(at_50.shape[1]) if (at_50[:, k] > -1).all()]
    for value, k in sorted(ap50, reverse=True)[:max_classes]:
        right.plot(recall, at_50[:, k], label=f"{names.get(category_ids[k], category_ids[k])} ({value:.2f})")
    right.set_title(f"IoU 0.50, top {min(max_classes, len(ap50))} classes by AP50")
    for axis in (left, right):
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("recall")
        axis.set_ylabel("precision")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_eval_plots(source, out_dir=None, coco_gt=None, log=None):
    """Writes per_class_ap.png and pr_curve.png; returns the list of written paths.

    source: path of eval.json (its folder is the default ``out_dir``; detections.json beside it
    feeds the PR curve), a metrics dict as ``evaluate_coco`` returns it, or a pycocotools
    ``COCOeval`` after ``accumulate()``. coco_gt: ground truth (COCO object or instances JSON path),
    needed for the PR curve unless ``source`` is a COCOeval. Without matplotlib nothing is
    written and a message with the install command goes to ``log`` (stderr).
    """
    log = log or sys.stderr
    plt = _matplotlib()
    if plt is None:
        log.write(f"matplotlib is not installed: skipping the evaluation plots (install it with `{INSTALL_HINT}`)\n")
        return []
    precision = per_class = None
    detections_path = None
    if hasattr(source, "eval") and hasattr(source, "params"):  # a COCOeval
        precision, category_ids, names = _from_coco_eval(source)
        per_class = [{"category_id": c, "name": names.get(c, str(c)),
                      "AP": _mean_or_none(precision[:, :, k, 0, -1]), "AP50": _mean_or_none(precision[0, :, k, 0, -1])}
                     for k, c in enumerate(category_ids)]
    else:
        if isinstance(source, (str, os.PathLike)):
            with open(source) as handle:
                metrics = json.load(handle)
            out_dir = out_dir or os.path.dirname(os.path.abspath(source))
            detections_path = os.path.join(os.path.dirname(os.path.abspath(source)), "detections.json")
        elif isinstance(source, dict):
            metrics = source
        else:
            raise TypeError(f"write_eval_plots: source must be an eval.json path, a metrics dict or a COCOeval, "
                            f"got {type(source).__name__}")
        if "per_class" not in metrics:
            raise ValueError("write_eval_plots: the metrics have no 'per_class' entry (not an eval.json?)")
        per_class = metrics["per_class"]
        if coco_gt is not None and detections_path and os.path.isfile(detections_path):
            precision, category_ids, names = precision_table(coco_gt, detections_path)
    if out_dir is None:
        raise ValueError("write_eval_plots: out_dir is required unless source is an eval.json path")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    bars = os.path.join(out_dir, AP_BARS_FILE)
    plot_per_class_ap(per_class, bars, plt)
    written.append(bars)
    if precision is not None:
        curves = os.path.join(out_dir, PR_CURVE_FILE)
        plot_pr_curves(precision, category_ids, names, curves, plt)
        written.append(curves)
    else:
        log.write("precision-recall curve skipped: it needs the ground truth (coco_gt=...) and detections.json "
                  "beside eval.json, or a COCOeval\n")
    return written


def _mean_or_none(values):
    values = values[values > -1]
    return float(values.mean()) if values.size else None
