"""Segmentation metrics: hand-checked IoU / F1 / pixel accuracy, ignored pixels, object matching, report files."""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from engine_segment import dice_loss, seg_loss
from util.seg_metrics import (SegMetricAccumulator, confusion_matrix, format_seg_table, metrics_from_confusion,
                              object_matches, save_seg_report)


def test_confusion_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    cm = confusion_matrix(pred, target, 3, 255)
    assert cm.tolist() == [[2, 1, 0], [1, 3, 0], [0, 0, 0]]  # the 255 pixel is not counted
    m = metrics_from_confusion(cm, ["bg", "building", "road"])
    assert math.isclose(m["iou"]["bg"], 100 * 2 / 4) and math.isclose(m["iou"]["building"], 100 * 3 / 5)
    assert math.isnan(m["iou"]["road"])  # absent everywhere: left out of the mean
    assert math.isclose(m["miou"], 100 * (0.5 + 0.6) / 2)
    assert math.isclose(m["pixel_acc"], 100 * 5 / 7) and m["pixels"] == 7
    assert math.isclose(m["f1"]["building"], 100 * 6 / 8)


def test_object_matching_spacenet_style():
    truth = np.zeros((20, 20), bool)
    truth[2:6, 2:6] = True      # A: 16 px
    truth[10:14, 10:14] = True  # B: 16 px
    truth[2:4, 15:17] = True    # C: missed
    pred = np.zeros((20, 20), bool)
    pred[2:6, 2:7] = True       # IoU 16/20 with A -> match
    pred[12:16, 12:16] = True   # IoU 4/28 with B -> no match
    pred[17:19, 0:3] = True     # spurious
    assert object_matches(pred, truth) == (1, 2, 2)
    assert object_matches(np.zeros_like(pred), truth) == (0, 0, 3)
    acc = SegMetricAccumulator(["bg", "building"], object_class=1)
    acc.update(torch.from_numpy(pred.astype(np.uint8)), torch.from_numpy(truth.astype(np.uint8)))
    out = acc.compute()
    assert out["objects"] == {"tp": 1, "fp": 2, "fn": 2} and math.isclose(out["object_f1"], 100 * 2 / 6)


def test_losses_ignore_pixels_and_dice():
    target = torch.tensor([[[0, 1], [1, 255]]])
    good = torch.full((1, 2, 2, 2), -10.0)
    good[0, 0, 0, 0] = good[0, 1, 0, 1] = good[0, 1, 1, 0] = 10.0
    bad_on_ignored = good.clone()
    bad_on_ignored[0, :, 1, 1] = torch.tensor([10.0, -10.0])  # the ignored pixel may say anything
    assert seg_loss(good, target) < 1e-6 and torch.equal(seg_loss(good, target), seg_loss(bad_on_ignored, target))
    assert dice_loss(good, target) < 1e-3 and dice_loss(-good, target) > 0.7  # all wrong (eps=1 smoothing on 3 px)
    assert seg_loss(good, target, dice_weight=1.0) < 1e-3


def test_report_files(tmp_path):
    row = {"miou": 50.0, "pixel_acc": 90.0, "iou": {"background": 90.0, "building": 10.0},
           "f1": {"background": 95.0, "building": 18.0}, "input_px": 64, "object_f1": 5.0}
    result = {"classes": ["background", "building"], "f1_class": "building",
              "scales": {"1": row, "0.5": {**row, "input_px": 32}}, "mean": {"miou": 50.0, "pixel_acc": 90.0}}
    paths = save_seg_report(result, tmp_path, "seg")
    assert json.loads(paths["json"].read_text())["scales"]["0.5"]["input_px"] == 32
    table = format_seg_table(result)
    assert "| 0.5 | 32 | 50.00 | 90.00 | 90.00 | 10.00 | 18.00 | 5.00 |" in table
    assert paths["png"].stat().st_size > 0
