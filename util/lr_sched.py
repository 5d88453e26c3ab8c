"""Learning-rate schedule: per-iteration linear warmup, then half-cosine decay to ``min_lr``.

Called at every optimizer step (accumulation boundary) with the fractional epoch
``epoch + step / len(loader)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["adjust_learning_rate", "lr_at", "effective_lr"]


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Scheduled learning rate at fractional ``epoch``.

    * ``epoch < warmup_epochs``: ``lr * epoch / warmup_epochs`` (0 at the very first step).
    * afterwards: ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup)))``,
      reaching ``min_lr`` at ``epochs`` and staying there beyond.
    * if ``warmup_epochs >= epochs`` there is no cosine phase: the warmup ramp runs as configured and the
      rate holds at ``lr`` once it is reached (no division by zero).
    """
    if epoch < 0:
        raise ValueError(f"lr schedule: epoch must be >= 0, got {epoch}")
    if warmup_epochs < 0 or epochs <= 0:
        raise ValueError(f"lr schedule: need warmup_epochs >= 0 and epochs > 0, got warmup_epochs={warmup_epochs}, "
                         f"epochs={epochs}")
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    decay_span = epochs - warmup_epochs
    if decay_span <= 0:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / decay_span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: Any) -> float:
    """Set every param group's ``lr`` to the scheduled rate times its ``lr_scale`` (default 1) and return the rate.

    Reads ``args.lr``, ``args.min_lr`` (default 0), ``args.warmup_epochs`` (default 0) and ``args.epochs``.
    """
    lr = lr_at(float(epoch), float(args.lr), float(getattr(args, "min_lr", 0.0) or 0.0),
               float(getattr(args, "warmup_epochs", 0) or 0), float(args.epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def effective_lr(blr: float, batch_size: int, accum_iter: int = 1, world_size: int = 1) -> float:
    """Absolute learning rate from the base rate: ``blr * batch_size * accum_iter * world_size / 256``."""
    if batch_size <= 0 or accum_iter <= 0 or world_size <= 0:
        raise ValueError(f"effective_lr: batch_size, accum_iter and world_size must be positive, got "
                         f"{batch_size}, {accum_iter}, {world_size}")
    return blr * batch_size * accum_iter * world_size / 256
