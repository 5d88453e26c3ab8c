"""Segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy, per-class F1, SpaceNet-style object
F1, summed exactly across ranks; the evaluation table (one row per evaluation scale), JSON and plot.

Conventions: ``confusion[t, p]`` counts pixels of true class ``t`` predicted as ``p``; pixels labelled
``ignore_index`` are not counted. ``IoU_c = TP / (TP + FP + FN)``; a class absent from both labels and predictions
has IoU NaN and is left out of the mean (as mmseg does). Pixel F1 of a class is ``2 TP / (2 TP + FP + FN)``.

Object F1 (SpaceNet): connected regions (4-connectivity) of one class in the prediction and in the ground truth are
polygonised (``rasterio.features.shapes``); a prediction matches a ground-truth object when their IoU is >= 0.5,
greedily by decreasing IoU, each object matched at most once; F1 = 2 TP / (2 TP + FP + FN). Computed on whole
tiles; ground-truth objects are the connected regions of the rasterised labels (touching buildings merge).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from util.metrics import save_report

__all__ = ["confusion_matrix", "metrics_from_confusion", "object_matches", "SegMetricAccumulator",
           "format_seg_table", "save_seg_report"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: Optional[int] = 255) -> torch.Tensor:
    """int64 [K, K] counts of (true, predicted) over pixels whose label is not ``ignore_index``."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def metrics_from_confusion(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """``{"iou": {name: %}, "f1": {name: %}, "miou", "pixel_acc", "pixels"}`` (percent; NaN for absent classes)."""
    cm = confusion.double()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    f1 = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.full_like(tp, float("nan")))
    total = float(cm.sum())
    present = ~torch.isnan(iou)
    return {
        "iou": {n: 100.0 * float(v) for n, v in zip(class_names, iou)},
        "f1": {n: 100.0 * float(v) for n, v in zip(class_names, f1)},
        "miou": 100.0 * float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_acc": 100.0 * float(tp.sum()) / total if total else float("nan"),
        "pixels": int(total),
    }


def _objects(mask: np.ndarray):
    from rasterio.features import shapes
    from shapely.geometry import shape

    return [shape(geom) for geom, value in shapes(mask.astype(np.uint8), mask=mask.astype(bool), connectivity=4)
            if value == 1]


def object_matches(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) of SpaceNet-style object matching between two boolean masks of one tile (module docstring)."""
    import shapely

    pred_objs, true_objs = _objects(pred), _objects(truth)
    if not pred_objs or not true_objs:
        return 0, len(pred_objs), len(true_objs)
    tree = shapely.STRtree(true_objs)
    pairs = []
    for i, p in enumerate(pred_objs):
        for j in tree.query(p, predicate="intersects"):
            t = true_objs[j]
            inter = p.intersection(t).area
            iou = inter / (p.area + t.area - inter)
            if iou >= iou_threshold:
                pairs.append((iou, i, int(j)))
    used_p, used_t = set(), set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    tp = len(used_p)
    return tp, len(pred_objs) - tp, len(true_objs) - tp


class SegMetricAccumulator:
    """Confusion matrix (+ optional object counts of one class) over tiles, summed exactly across ranks.

    ``update(pred [H, W], target [H, W])`` per tile; ``compute()`` all-reduces (when a process group is up) and
    returns :func:`metrics_from_confusion` plus ``object_f1``/``object_precision``/``object_recall`` (percent) and
    ``objects`` (TP, FP, FN) when ``object_class`` is set.
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int = 255, object_class: Optional[int] = None,
                 iou_threshold: float = 0.5) -> None:
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.object_class = object_class
        self.iou_threshold = iou_threshold
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.objects = torch.zeros(3, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.object_class is not None:
            valid = (target != self.ignore_index).cpu().numpy()
            p = (pred.cpu().numpy() == self.object_class) & valid
            t = (target.cpu().numpy() == self.object_class) & valid
            self.objects += torch.tensor(object_matches(p, t, self.iou_threshold), dtype=torch.int64)

    def compute(self) -> dict[str, Any]:
        from util import dist as dist_util

        counts = torch.cat([self.confusion.reshape(-1), self.objects])
        if dist_util.is_dist_avail_and_initialized():
            import torch.distributed as dist

            t = counts.to(dist_util.comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            counts = t.cpu()
        k = self.num_classes
        out = metrics_from_confusion(counts[:k * k].reshape(k, k), self.class_names)
        if self.object_class is not None:
            tp, fp, fn = (int(v) for v in counts[k * k:])
            out["objects"] = {"tp": tp, "fp": fp, "fn": fn}
            out["object_precision"] = 100.0 * tp / (tp + fp) if tp + fp else float("nan")
            out["object_recall"] = 100.0 * tp / (tp + fn) if tp + fn else float("nan")
            out["object_f1"] = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        return out


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_seg_table(result: dict[str, Any]) -> str:
    """One row per evaluation scale: input side, res, mIoU, pixel accuracy, IoU per class, F1 of the object class
    (pixel, and object F1 when computed); a mean row over scales."""
    classes = result["classes"]
    fclass = result.get("f1_class")
    cols = ["scale", "input (px)", "mIoU", "pixel acc"] + [f"IoU {c}" for c in classes]
    if fclass:
        cols.append(f"F1 {fclass}")
    has_obj = any("object_f1" in s for s in result["scales"].values())
    if has_obj:
        cols.append(f"object F1 {fclass} (IoU 0.5)")
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, s in result["scales"].items():
        cells = [key, str(s["input_px"]), _fmt(s["miou"]), _fmt(s["pixel_acc"])] + [_fmt(s["iou"][c]) for c in classes]
        if fclass:
            cells.append(_fmt(s["f1"][fclass]))
        if has_obj:
            cells.append(_fmt(s.get("object_f1")))
        rows.append("| " + " | ".join(cells) + " |")
    mean = result.get("mean", {})
    cells = ["mean", "", _fmt(mean.get("miou")), _fmt(mean.get("pixel_acc"))] + ["" for _ in classes]
    cells += [""] * (bool(fclass) + has_obj)
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot_seg(result: dict[str, Any], ax) -> None:
    """mIoU and the IoU of each foreground class against the evaluation scale."""
    scales = list(result["scales"])
    xs = [float(s) for s in scales]
    ax.plot(xs, [result["scales"][s]["miou"] for s in scales], marker="o", label="mIoU")
    for c in result["classes"][1:]:
        ax.plot(xs, [result["scales"][s]["iou"][c] for s in scales], marker=".", linestyle="--", label=f"IoU {c}")
    ax.set_xticks(xs, scales)
    ax.set_xlabel("evaluation scale (fraction of the native pixel count per side)")
    ax.set_ylabel("%")


def save_seg_report(result: dict[str, Any], output_dir: str | os.PathLike, tag: str = "seg") -> dict[str, Path]:
    """Write ``{tag}.json``, ``{tag}.md`` and an mIoU/IoU-vs-scale plot ``{tag}.png``; returns the paths."""
    return save_report(result, output_dir, tag, format_seg_table, _plot_seg)
