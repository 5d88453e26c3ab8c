"""Tests for util/lr_sched.py: warmup + half-cosine schedule, lr_scale, effective lr."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from util.lr_sched import adjust_learning_rate, effective_lr, lr_at


def _opt() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=123.0)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),            # warmup start
    (1.0, 0.25),           # warmup, fractional
    (2.0, 0.5),            # warmup middle
    (4.0, 1.0),            # warmup end = cosine start
    (8.0, 0.1 + 0.9 * 0.5),  # cosine midpoint
    (10.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75))),
    (12.0, 0.1),           # end
    (13.5, 0.1),           # beyond the end stays at min_lr
])
def test_schedule_values_and_lr_scale(epoch, expected):
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=4, epochs=12)
    opt = _opt()
    lr = adjust_learning_rate(opt, epoch, args)
    assert lr == pytest.approx(expected, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * expected, abs=1e-12)
    assert opt.param_groups[1]["lr"] == pytest.approx(expected, abs=1e-12)


def test_per_iteration_warmup_is_linear():
    # fractional epochs as used per iteration: epoch + step / len(loader)
    vals = [lr_at(0 + s / 10, 2.0, 0.0, 1.0, 5.0) for s in range(10)]
    assert vals == pytest.approx([0.2 * s for s in range(10)])


def test_no_warmup_and_defaults():
    args = argparse.Namespace(lr=2.0, epochs=10)  # min_lr / warmup_epochs absent -> 0
    assert adjust_learning_rate(_opt(), 0.0, args) == pytest.approx(2.0)
    assert adjust_learning_rate(_opt(), 5.0, args) == pytest.approx(1.0)
    assert adjust_learning_rate(_opt(), 10.0, args) == pytest.approx(0.0)


@pytest.mark.parametrize("warmup, epochs", [(5, 5), (8, 5)])
def test_warmup_not_shorter_than_training(warmup, epochs):
    assert lr_at(2.5, 1.0, 0.0, warmup, epochs) == pytest.approx(2.5 / warmup)
    assert lr_at(float(warmup), 1.0, 0.0, warmup, epochs) == pytest.approx(1.0)  # no ZeroDivisionError
    assert lr_at(float(warmup) + 3, 1.0, 0.0, warmup, epochs) == pytest.approx(1.0)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="epoch"):
        lr_at(-1.0, 1.0, 0.0, 1, 10)
    with pytest.raises(ValueError, match="epochs"):
        lr_at(0.0, 1.0, 0.0, 1, 0)


def test_effective_lr():
    assert effective_lr(1.5e-4, 32) == pytest.approx(1.5e-4 * 32 / 256)
    assert effective_lr(1e-3, 64, accum_iter=2, world_size=8) == pytest.approx(1e-3 * 4)
    with pytest.raises(ValueError):
        effective_lr(1e-3, 0)
