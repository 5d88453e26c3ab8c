"""Scale-MAE encoder as a timm ``VisionTransformer`` for linear probing, finetuning and feature extraction.

The only change to timm's ViT is the positional-embedding hook: instead of the learned ``pos_embed`` table, every
forward adds the GSD-scaled sin-cos embedding of ``input_res`` (per sample, any square input side, cls slot zero).
The learned ``pos_embed`` parameter stays in the state dict (timm key names, original checkpoint layout) but is not
used. Loading a Scale-MAE pretraining checkpoint goes through :func:`load_mae_checkpoint`, which checks that the
missing and unexpected keys are exactly the expected ones instead of silently loading with ``strict=False``.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models import vision_transformer as timm_vit
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from layers.common import unsafe_patch_embed
from util.gsd import as_res
from util.pos_embed import gsd_sincos_pos_embed
from util.weights import (MAE_ONLY_PREFIXES, extract_state_dict, infer_encoder_arch, load_encoder_file,
                          state_dict_of)

__all__ = [
    "VisionTransformer",
    "vit_tiny_patch16",
    "vit_base_patch16",
    "vit_large_patch16",
    "vit_huge_patch14",
    "MODELS",
    "load_mae_checkpoint",
    "checkpoint_filter_fn",
    "MAE_ONLY_PREFIXES",
    "import_encoder",
]

class VisionTransformer(timm_vit.VisionTransformer):
    """timm ViT with Scale-MAE's GSD positional embedding.

    Args:
        global_pool: mean of patch tokens followed by ``fc_norm`` (keys ``fc_norm.*``, no ``norm.*``) instead of
            the cls token after ``norm``.
        img_size: only sizes the unused learned ``pos_embed`` (checkpoint compatibility); any square input side
            works at run time.
        **kwargs: timm ``VisionTransformer`` arguments (``embed_dim``, ``depth``, ``num_heads``, ``num_classes``, ...).
    """

    def __init__(self, global_pool: bool = False, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 **kwargs: Any):
        kwargs.setdefault("qkv_bias", True)
        kwargs.setdefault("mlp_ratio", 4)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            global_pool="avg" if global_pool else "token", **kwargs,
        )
        self.global_pool_enabled = global_pool
        self.patch_embed = unsafe_patch_embed(patch_size, in_chans, self.embed_dim)

    def _pos_embed(self, x: torch.Tensor, input_res: Optional[torch.Tensor] = None,
                   grid: Optional[int] = None) -> torch.Tensor:
        """x: [N, L, D] patch tokens -> [N, 1 + L, D] with cls prepended and the GSD embedding of ``input_res`` added.

        ``grid`` (tokens per side) defaults to ``sqrt(L)``: timm's own entry points (``get_intermediate_layers``,
        ``forward_features`` of the base class) call ``self._pos_embed(x)`` with the tokens alone, and must still get
        the full table (res 1), not the cls row broadcast over every token.
        """
        n, length = x.shape[0], x.shape[1]
        if grid is None or grid <= 0:
            grid = math.isqrt(length)
        if grid * grid != length:
            raise ValueError(f"expected a square patch grid, got {length} tokens (grid {grid})")
        pos = gsd_sincos_pos_embed(x.shape[-1], grid, as_res(input_res, n, x)).to(x.dtype)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1) + pos
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor, input_res: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [N, C, S, S] image -> [N, 1 + L, D] tokens entering the first block."""
        if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"expected a square batch [N, C, S, S], got shape {tuple(x.shape)}")
        grid = x.shape[-1] // self.patch_embed.patch_size[0]
        x = self._pos_embed(self.patch_embed(x), input_res, grid)
        return self.norm_pre(self.patch_drop(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        input_res: Optional[torch.Tensor] = None,
    ):
        """timm's feature API with the per-sample GSD embedding: the outputs of the blocks ``indices``.

        Same contract as ``timm.models.vision_transformer.VisionTransformer.forward_intermediates`` (``indices``:
        last n blocks for an int, all for None, else the listed ones, negative from the end; ``output_fmt``
        ``NCHW`` gives maps ``[N, D, G, G]``, ``NLC`` tokens ``[N, G*G, D]``; the cls token is split off, returned
        with ``return_prefix_tokens``), plus ``input_res`` ``[N]`` (None means ones) for the positional embedding.
        Returns ``intermediates`` (``intermediates_only``), ``(final normed tokens [N, 1 + L, D], intermediates)``
        or a dict (``output_dict``) as timm does.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        n, side = x.shape[0], x.shape[-1]
        x = self._embed(x, input_res)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        outs: list[torch.Tensor] = []
        for i, blk in enumerate(blocks):
            if attn_mask is not None or is_causal:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take:
                outs.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in outs]
        outs = [y[:, self.num_prefix_tokens:] for y in outs]
        if output_fmt == "NCHW":
            grid = side // self.patch_embed.patch_size[0]
            outs = [y.reshape(n, grid, grid, -1).permute(0, 3, 1, 2).contiguous() for y in outs]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": outs}
            if return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens:
            outs = list(zip(outs, prefix))
        if intermediates_only:
            return outs
        return self.norm(x), outs

    def forward_features(self, x: torch.Tensor, input_res: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, C, H, H], input_res: [N] (None means ones) -> tokens [N, 1 + L, D] after the final norm."""
        x = self._embed(x, input_res)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, input_res: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, C, H, H], input_res: [N] -> logits [N, num_classes] (features [N, D] when ``num_classes=0``)."""
        return self.forward_head(self.forward_features(x, input_res))


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs: Any) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def vit_tiny_patch16(**kwargs: Any) -> VisionTransformer:
    """Encoder of ``models_mae.mae_vit_tiny_patch16`` (192-d, 4 blocks, 3 heads)."""
    return _vit(16, 192, 4, 3, **kwargs)


def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (768-d, 12 blocks, 12 heads)."""
    return _vit(16, 768, 12, 12, **kwargs)


def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16 (1024-d, 24 blocks, 16 heads): the released Scale-MAE encoder."""
    return _vit(16, 1024, 24, 16, **kwargs)


def vit_huge_patch14(**kwargs: Any) -> VisionTransformer:
    """ViT-H/14 (1280-d, 32 blocks, 16 heads)."""
    return _vit(14, 1280, 32, 16, **kwargs)


MODELS = {
    "vit_tiny_patch16": vit_tiny_patch16,
    "vit_base_patch16": vit_base_patch16,
    "vit_large_patch16": vit_large_patch16,
    "vit_huge_patch14": vit_huge_patch14,
}


class LoadReport(NamedTuple):
    """Keys the model did not get from the checkpoint, and checkpoint keys the model has no use for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a pretraining (or encoder) state dict to ``model``.

    Drops the tensors whose shape legitimately differs: the unused learned ``pos_embed`` (input size other than the
    checkpoint's) and a classifier ``head`` of another size. Decoder keys are left in place so that the loader can
    report them as the expected unexpected keys.
    """
    own = model.state_dict()
    out = dict(state_dict)
    for key in [k for k in out if k == "pos_embed" or k.startswith("head.")]:
        if key in own and own[key].shape != out[key].shape:
            del out[key]
    return out


def load_mae_checkpoint(
    model: VisionTransformer,
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
) -> LoadReport:
    """Load a Scale-MAE checkpoint (ours, the original's ``{'model': ...}`` release, or an encoder-only state dict).

    The missing keys must be exactly the classifier head (plus ``fc_norm.*`` with global pooling, plus the unused
    ``pos_embed`` when the input size differs) and the unexpected keys only decoder tensors (plus ``norm.*`` with
    global pooling). Anything else (a wrong architecture, a truncated file, another model's weights) raises a
    ``ValueError`` naming the keys and shapes.
    """
    source = "state dict"
    if not isinstance(checkpoint, Mapping):
        from util.checkpoint import load_checkpoint

        source = str(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    state_dict = checkpoint_filter_fn(state_dict_of(checkpoint), model)

    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items() if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"{source} does not match the model (wrong --model or in_chans?):\n  " + "\n  ".join(mismatched))

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    pooled = model.global_pool_enabled
    bad_missing = [
        k for k in missing
        if not (k.startswith("head.") or k == "pos_embed" or (pooled and k.startswith("fc_norm.")))
    ]
    bad_unexpected = [
        k for k in unexpected if not (k.startswith(MAE_ONLY_PREFIXES) or (pooled and k.startswith("norm.")))
    ]
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"{source} is not a Scale-MAE checkpoint for this encoder: missing {sorted(bad_missing)}, "
            f"unexpected {sorted(bad_unexpected)} (expected missing: head.*; unexpected: decoder keys only)"
        )
    model.load_state_dict(state_dict, strict=False)
    return LoadReport(missing, unexpected)


def import_encoder(path_or_state: Union[str, os.PathLike, Mapping[str, Any]], num_classes: int = 0,
                   global_pool: Optional[bool] = None, img_size: Optional[int] = None,
                   num_heads: Optional[int] = None) -> VisionTransformer:
    """Build a GSD-aware :class:`VisionTransformer` from an exported (``util.weights.export_encoder``) or any encoder
    file (or state dict) and load it; the architecture comes from the tensor shapes (``util.weights``).

    Loading goes through ``models_vit.load_mae_checkpoint``, which verifies that only ``head.*`` is missing (nothing
    with ``num_classes=0``). The stored ``pos_embed`` table is kept in the model's unused ``pos_embed`` slot;
    ``models_vit`` recomputes the embedding from ``input_res`` on every forward.
    """
    if isinstance(path_or_state, Mapping):
        state, meta = extract_state_dict(path_or_state), {}
    else:
        state, meta = load_encoder_file(path_or_state)
    if num_heads is None and isinstance(meta.get("architecture"), Mapping):
        num_heads = meta["architecture"].get("num_heads")
    arch = infer_encoder_arch(state, num_heads=num_heads, img_size=img_size)
    pool = arch.global_pool if global_pool is None else bool(global_pool)
    model = VisionTransformer(
        patch_size=arch.patch_size, in_chans=arch.in_chans, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, img_size=arch.img_size, num_classes=num_classes,
        global_pool=pool)
    load_mae_checkpoint(model, state)
    return model
