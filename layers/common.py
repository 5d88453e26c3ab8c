"""Pieces shared by the models: the reference decoder (``models_mae.py``) and its fast path (``layers.fast_decoder``),
the encoders of ``models_mae.py`` and ``models_vit.py``."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import PatchEmbed

__all__ = ["Norm2d", "maybe_checkpoint", "unsafe_patch_embed"]


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


def unsafe_patch_embed(patch_size: int, in_chans: int, embed_dim: int) -> PatchEmbed:
    """timm ``PatchEmbed`` without the image-size check: any input side works, the conv drops a remainder.

    ``[N, C, H, W] -> [N, (H // p) * (W // p), D]`` (e.g. 56 px at p = 16 gives 3 x 3 tokens over the top-left 48 px).
    """
    return PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
