"""Pieces shared by the reference decoder (``models_mae.py``) and its fast path (``layers.fast_decoder``)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

__all__ = ["Norm2d", "maybe_checkpoint"]


class Norm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW map (keys ``<name>.ln.weight/bias``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> [N, C, H, W]"""
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, recomputed in backward instead of stored when ``enabled`` and gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
