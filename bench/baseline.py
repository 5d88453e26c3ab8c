"""The comparison point of the step-time benchmark: Scale-MAE's maths written the straightforward way.

``BaselineMAE`` is a subclass of :class:`models_mae.MaskedAutoencoderViT` (same parameters, same state dict, so
it loads the weights of the model it is compared with) whose forward is re-implemented here, functionally, from
the parameters -- it does not call the project's forward code, so optimisations made there do not leak into the
baseline. It computes what the original computes, the way the original (and a first straightforward port) does:

* per-sample GSD positional embeddings rebuilt on the host every forward: ``res`` is copied to the CPU, each
  sample's table is built in a Python loop with float64 numpy (MAE's ``get_2d_sincos_pos_embed`` with the grid
  scaled by ``res``), stacked, converted and moved to the model's device -- for the encoder (D wide), the decoder
  input (Dd wide) and the target grid (the original's dead ``pos_embed_decoder``, still built every step);
* unfused attention: ``softmax(q k^T * scale) v`` with explicit matmuls (``fused_attn = False`` is also set on
  every timm block so that calling the parent's code paths would be unfused too);
* the original's loss: both band targets built from ``targets``, the mask nearest-upsampled to the full 448 px
  and 224 px prediction sizes, masked squared error summed over channels / number of masked pixels;
* the original's ``split_pred``: the recombined image and three patchified predictions, every step.

The maths (and therefore the loss, to float rounding) is identical to the project's model; the benchmark checks
that on shared weights, inputs and masking noise.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models_mae

__all__ = ["BaselineMAE", "host_pos_embed", "baseline_from"]


# ------------------------------------------------------------------------------------ float64 numpy tables
def _np_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's ``get_1d_sincos_pos_embed_from_grid``: pos (M,) -> (M, embed_dim), float64."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _np_2d_sincos_with_res(embed_dim: int, grid_size: int, res: float, cls_token: bool) -> np.ndarray:
    """One sample's table: MAE's 2-D table with the grid positions multiplied by ``res``: (1 + G*G, E)."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0) * res  # w first: grid[0] varies along columns
    emb_col = _np_1d_sincos(embed_dim // 2, grid[0])
    emb_row = _np_1d_sincos(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_col, emb_row], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def host_pos_embed(embed_dim: int, grid_size: int, res: torch.Tensor, device: torch.device,
                   cls_token: bool = True) -> torch.Tensor:
    """Per-sample tables built on the host (Python loop, float64 numpy) and moved to ``device``: [N, 1+G*G, E]."""
    res_host = res.detach().cpu().numpy().astype(np.float64)
    tables = [_np_2d_sincos_with_res(embed_dim, grid_size, float(r), cls_token) for r in res_host]
    return torch.from_numpy(np.stack(tables)).float().to(device)


# ------------------------------------------------------------------------------------ functional layers
def _norm2d(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a head layer functionally from its parameters (modules of unknown type are simply called)."""
    if isinstance(module, nn.Sequential):
        for m in module:
            x = _apply(m, x)
        return x
    if isinstance(module, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, module.weight, module.bias, module.stride, module.padding,
                                  module.output_padding, module.groups, module.dilation)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.GELU):
        return F.gelu(x)
    if isinstance(module, models_mae.Norm2d):
        return _norm2d(module.ln, x)
    return module(x)


def _block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block`` (pre-norm attention + GELU MLP, no layer scale / drop path) with unfused attention."""
    attn = blk.attn
    n, length, dim = x.shape
    heads = attn.num_heads
    h = F.layer_norm(x, blk.norm1.normalized_shape, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(n, length, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, length, dim)
    x = x + F.linear(out, attn.proj.weight, attn.proj.bias)
    h = F.layer_norm(x, blk.norm2.normalized_shape, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class BaselineMAE(models_mae.MaskedAutoencoderViT):
    """Straightforward implementation of the original's maths on the parent's parameters (see module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for blk in list(self.blocks) + list(self.decoder_blocks):
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = False

    # ------------------------------------------------------------------------------------------- encoder
    def _masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor]):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, input_res, noise=None):
        proj = self.patch_embed.proj
        x = F.conv2d(imgs, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)  # [N, L, D]
        grid = int(x.shape[1] ** 0.5)
        pos = host_pos_embed(x.shape[-1], grid, input_res, x.device)
        x = x + pos[:, 1:, :]
        x, mask, ids_restore = self._masking(x, mask_ratio, noise)
        cls_tokens = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = _block(blk, x)
        x = _layer_norm(self.norm, x)
        pos_embed_encoder = host_pos_embed(self.decoder_embed.out_features, grid, input_res, x.device)
        return x, mask, ids_restore, pos_embed_encoder

    # ------------------------------------------------------------------------------------------- decoder
    def _fcn(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = _apply(head.proj, x)
        for hffb in head.conv_blocks:
            x = _apply(hffb.convs, x) + _apply(hffb.residual, x)
        return _apply(head.pred, x)

    def forward_decoder(self, latent, ids_restore, pos_embed_encoder):
        x = F.linear(latent, self.decoder_embed.weight, self.decoder_embed.bias)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + pos_embed_encoder
        x = x[:, 1:, :]
        for blk in self.decoder_blocks:
            x = _block(blk, x)
        x = _layer_norm(self.decoder_norm, x)
        grid = int(length**0.5)
        x = x.permute(0, 2, 1).reshape(n, -1, grid, grid)
        fpn = self.fpn
        coarse = _apply(fpn.fpn2, x)
        fine = _apply(fpn.fpn1, coarse if fpn.progressive else x)
        if self.independent_fcn_head:
            return self._fcn(self.fcn_high, fine), self._fcn(self.fcn_low, coarse)
        return self._fcn(self.fcn, fine), self._fcn(self.fcn, coarse)

    # ---------------------------------------------------------------------------------------------- loss
    def forward_loss(self, targets, pred_high, pred_low, mask):
        dim1, dim2 = self.band_config
        side = targets.shape[-1]
        low_side = pred_low.shape[-1]
        target_high = targets - F.interpolate(F.interpolate(targets, size=(dim1, dim1), mode="area"),
                                              size=(side, side), mode="bilinear", align_corners=False)
        if dim2 == 224:
            target_low = F.interpolate(F.interpolate(targets, size=(224, 224), mode="area"),
                                       size=(low_side, low_side), mode="area")
        else:
            target_low = F.interpolate(targets, size=(low_side, low_side), mode="area")
        grid = int(mask.shape[1] ** 0.5)
        mask = mask.reshape(-1, 1, grid, grid).float()
        mask_high = F.interpolate(mask, size=pred_high.shape[-2:], mode="nearest")
        mask_low = F.interpolate(mask, size=pred_low.shape[-2:], mode="nearest")
        if self.use_l1_loss:
            loss_high = (torch.abs(target_high - pred_high) * self.l1_loss_weight * mask_high).sum()
        else:
            loss_high = ((target_high - pred_high) ** 2 * mask_high).sum()
        loss_high = loss_high / (mask_high.sum() + 1e-9)
        loss_low = ((target_low - pred_low) ** 2 * mask_low).sum() / (mask_low.sum() + 1e-9)
        return loss_high + loss_low

    def _split_pred(self, pred_high, pred_low, grid):
        dim1 = self.band_config[0]
        low = F.interpolate(pred_low, size=(dim1, dim1), mode="area")
        pred_all = F.interpolate(low, size=pred_high.shape[-2:], mode="bilinear", align_corners=False) + pred_high
        return [self.patchify(p, self._pred_patch(p.shape[-1], grid)) for p in (pred_high, pred_low, pred_all)]

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, imgs, targets=None, mask_ratio=0.75, knn_feats=False, input_res=None, target_res=None,
                source_size=None, noise=None):
        if source_size is not None or self.absolute_scale:
            raise NotImplementedError("the benchmark baseline covers the default configuration only")
        n = imgs.shape[0]
        input_res = torch.ones(n) if input_res is None else torch.as_tensor(input_res).reshape(-1).float()
        target_res = torch.ones(n) if target_res is None else torch.as_tensor(target_res).reshape(-1).float()
        if knn_feats:
            latent, _, _, _ = self.forward_encoder(imgs, 0.0, input_res, noise)
            return latent[:, 0]
        grid = imgs.shape[-1] // self.patch_size
        latent, mask, ids_restore, pos_embed_encoder = self.forward_encoder(imgs, mask_ratio, input_res, noise)
        pos_embed_decoder = host_pos_embed(self.decoder_embed.out_features, targets.shape[-1] // self.patch_size,
                                           target_res, imgs.device)  # dead in the original, built every step
        pred_high, pred_low = self.forward_decoder(latent, ids_restore, pos_embed_encoder)
        loss = self.forward_loss(targets, pred_high, pred_low, mask)
        preds = self._split_pred(pred_high, pred_low, grid)
        return loss, preds, mask, 0, 1, pos_embed_encoder, pos_embed_decoder, imgs


def baseline_from(model: models_mae.MaskedAutoencoderViT, **config) -> BaselineMAE:
    """A ``BaselineMAE`` built with ``config`` carrying a copy of ``model``'s weights (strict load)."""
    base = BaselineMAE(**config)
    base.load_state_dict(model.state_dict(), strict=True)
    return base.to(next(model.parameters()).device)
