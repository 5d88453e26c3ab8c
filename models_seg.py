"""Semantic segmentation on the Scale-MAE encoder: multi-level ViT features + UPerNet (the paper's SpaceNet setup).

Pipeline (the MAE / BEiT segmentation recipe on a plain ViT)::

    image [N, C, S, S], input_res [N]
      -> encoder blocks ``out_indices`` (ViT-L 7, 11, 15, 23; ViT-B 3, 5, 7, 11), patch tokens as maps [N, D, G, G]
         (G = S / p), each with the per-sample GSD positional embedding of ``input_res``
      -> FeaturePyramidNeck: 4x (two 2x2 transposed convs), 2x (one), 1x (identity), 0.5x (2x2 max-pool)
         = strides p/4, p/2, p, 2p (1/4, 1/8, 1/16, 1/32 of the input at p = 16)
      -> UPerHead: pyramid pooling (1, 2, 3, 6) on the coarsest map, FPN top-down path, 3x3 convs, all levels
         upsampled to the finest and fused -> logits at 1/4, bilinearly upsampled to [N, K, S, S]
      (+ FCNHead on the 1/16 map: the optional auxiliary loss)

Normalisation in the neck and heads is ``BatchNorm2d`` (``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP on
CUDA, see ``main_segment.py``). Encoder tensors that the segmentation forward does not use (the final ``norm``, the
stored ``pos_embed``, blocks after the last ``out_indices`` entry) are frozen so that DDP sees no unused gradients;
they stay in the state dict so that the released encoder keys load unchanged under ``backbone.``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import models_vit
from util.weights import state_dict_of

__all__ = ["SEG_OUT_INDICES", "default_out_indices", "FeaturePyramidNeck", "UPerHead", "FCNHead",
           "SegmentationModel", "build_segmentation_model", "load_pretrained_encoder", "HEAD_PREFIXES"]

# Blocks whose outputs feed the pyramid, by encoder depth (0-based): the MAE/BEiT segmentation choices.
SEG_OUT_INDICES = {24: (7, 11, 15, 23), 12: (3, 5, 7, 11), 32: (7, 15, 23, 31)}
HEAD_PREFIXES = ("neck.", "decode_head.", "auxiliary_head.")


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The four blocks used for a ``depth``-block encoder: the table above, else the ends of four equal quarters
    (depth 4 -> 0, 1, 2, 3; depth 8 -> 1, 3, 5, 7)."""
    if depth in SEG_OUT_INDICES:
        return SEG_OUT_INDICES[depth]
    return tuple(max(0, round((i + 1) * depth / 4) - 1) for i in range(4))


class ConvBNReLU(nn.Sequential):
    """``Conv2d(k, padding k // 2, no bias) -> BatchNorm2d -> ReLU`` (keys ``0.weight``, ``1.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FeaturePyramidNeck(nn.Module):
    """Four ViT maps at stride p -> maps at strides p/4, p/2, p, 2p (channels unchanged).

    ``fpn1``: ConvT 2x2 -> BN -> GELU -> ConvT 2x2 (4x); ``fpn2``: ConvT 2x2 (2x); ``fpn3``: identity; ``fpn4``:
    2x2 max-pool. feats: 4 x [N, D, G, G] -> [N, D, 4G, 4G], [N, D, 2G, 2G], [N, D, G, G], [N, D, G/2, G/2].
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != 4:
            raise ValueError(f"FeaturePyramidNeck takes 4 maps, got {len(feats)}")
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """UPerNet decode head (Xiao et al. 2018): PPM on the coarsest level, FPN top-down fusion, concatenation.

    Args:
        in_channels: channels of the four input levels (finest first).
        channels: width of every internal conv (512 in the MAE/BEiT ViT-L configs).
        num_classes: output classes (background included).
        pool_scales: output sides of the pyramid-pooling branches.
        dropout: ``Dropout2d`` before the 1x1 classifier.

    feats: 4 x [N, C_i, H_i, W_i] (finest first) -> logits [N, K, H_0, W_0].
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        *fine, coarse = list(in_channels)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(coarse, channels, 1)) for s in pool_scales)
        self.bottleneck = ConvBNReLU(coarse + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in fine)
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pyramid pooling: x [N, C, h, w] -> [N, channels, h, w]."""
        pooled = [x] + [_resize(branch(x), x.shape[-2:]) for branch in self.psp_modules]
        return self.bottleneck(torch.cat(pooled, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.psp_forward(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the upsampled coarser level
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: ``ConvBNReLU(3x3) -> Dropout2d -> Conv1x1``; x [N, C, h, w] -> logits [N, K, h, w]."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class SegmentationModel(nn.Module):
    """Scale-MAE encoder (``backbone``, a ``models_vit.VisionTransformer``) + neck + UPerNet (+ auxiliary FCN).

    Args:
        backbone: the encoder; its classifier is removed (``num_classes=0``).
        num_classes: segmentation classes including background.
        out_indices: the four blocks whose outputs feed the pyramid (default :func:`default_out_indices`).
        channels: UPerNet width.
        aux_channels: width of the auxiliary FCN head on the 1/16 level; 0 or None: no auxiliary head.
        pool_scales, dropout: UPerNet options.

    ``forward(x [N, C, S, S], input_res [N] or None, return_aux=False)`` -> logits ``[N, K, S, S]`` (and the
    auxiliary logits ``[N, K, S, S]`` with ``return_aux`` when the head exists, else None).
    """

    def __init__(self, backbone: models_vit.VisionTransformer, num_classes: int,
                 out_indices: Optional[Sequence[int]] = None, channels: int = 512,
                 aux_channels: Optional[int] = 256, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        depth = len(backbone.blocks)
        out_indices = tuple(default_out_indices(depth) if out_indices is None else out_indices)
        if len(out_indices) != 4 or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices must be 4 block indexes in [0, {depth - 1}], got {list(out_indices)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.out_indices = out_indices
        self.num_classes = int(num_classes)
        dim = backbone.embed_dim
        self.neck = FeaturePyramidNeck(dim)
        self.decode_head = UPerHead([dim] * 4, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, dropout) if aux_channels else None
        self._take = sorted(set(out_indices))
        for name, param in self.backbone.named_parameters():
            if name == "pos_embed" or name.startswith(("norm.", "fc_norm.", "head.")) or (
                    name.startswith("blocks.") and int(name.split(".")[1]) > max(out_indices)):
                param.requires_grad = False  # not used by the segmentation forward

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    def encoder_maps(self, x: torch.Tensor, input_res: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """The ``out_indices`` block outputs as maps: 4 x [N, D, G, G] (G = S / patch)."""
        feats = self.backbone.forward_intermediates(x, indices=self._take, input_res=input_res, stop_early=True,
                                                    intermediates_only=True)
        by_block = dict(zip(self._take, feats))
        return [by_block[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor, input_res: Optional[torch.Tensor] = None, return_aux: bool = False):
        size = x.shape[-2:]
        if x.shape[-1] < 2 * self.patch_size:
            raise ValueError(f"input side {x.shape[-1]} px is below 2 patches ({2 * self.patch_size} px): the "
                             f"pyramid's 1/32 level needs a patch grid of at least 2")
        maps = self.neck(self.encoder_maps(x, input_res))
        logits = _resize(self.decode_head(maps), size)
        if not return_aux:
            return logits
        aux = _resize(self.auxiliary_head(maps[2]), size) if self.auxiliary_head is not None else None
        return logits, aux


def build_segmentation_model(model: str, num_classes: int, img_size: int = 224, in_chans: int = 3,
                             out_indices: Optional[Sequence[int]] = None, channels: int = 512,
                             aux_channels: Optional[int] = 256, **kwargs: Any) -> SegmentationModel:
    """``models_vit.<model>`` encoder (``vit_large_patch16``, ...; ``img_size`` only sizes the unused stored
    ``pos_embed``) wrapped in a :class:`SegmentationModel`."""
    if model not in models_vit.MODELS:
        raise ValueError(f"unknown encoder {model!r}; choose from {sorted(models_vit.MODELS)}")
    backbone = models_vit.MODELS[model](img_size=img_size, in_chans=in_chans, num_classes=0)
    return SegmentationModel(backbone, num_classes, out_indices=out_indices, channels=channels,
                             aux_channels=aux_channels, **kwargs)


def load_pretrained_encoder(model: SegmentationModel,
                            checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> models_vit.LoadReport:
    """Load a Scale-MAE pretraining checkpoint (the released ``{'model': ...}`` file, ours, or an exported encoder)
    into ``model.backbone`` through ``models_vit.load_mae_checkpoint`` (same key checks and filter).

    A classifier in the file (``head.*``, e.g. a timm export with 1000 classes) is dropped: the segmentation encoder
    has none. Returns the report in the segmentation model's key names: ``missing_keys`` = the neck and heads (plus
    ``backbone.pos_embed`` when the stored table's size differs), ``unexpected_keys`` = the pretraining decoder's.
    """
    if not isinstance(checkpoint, Mapping):
        from util.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(checkpoint)
    state = state_dict_of(checkpoint)
    if any(k.startswith("backbone.") for k in state):
        raise ValueError("this is a segmentation checkpoint (keys backbone.*): resume it with --resume instead")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    report = models_vit.load_mae_checkpoint(model.backbone, state)
    own_missing = [k for k in model.state_dict() if not k.startswith("backbone.")]
    return models_vit.LoadReport([f"backbone.{k}" for k in report.missing_keys] + own_missing,
                                 report.unexpected_keys)
