"""Scale-MAE: a masked autoencoder with a GSD-aware encoder and a two-band ("Laplacian") super-resolving decoder.

Encoder: a ViT whose fixed 2-D sin-cos positional embedding is rebuilt every forward with the grid positions scaled
by a per-sample relative ground sample distance ``input_res`` (see ``util/pos_embed.py``), with MAE random masking.

Decoder: MAE's un-shuffle with a learned mask token, the same GSD embedding (decoder width, input grid), a few
transformer blocks (cls dropped), then an FPN of transposed convolutions giving maps at 4x and 2x the token grid, and
two convolutional heads that upsample x8 to a high-frequency band (``32 * grid`` px) and a low-frequency band
(``16 * grid`` px). For p = 16 that is a 2x super-resolved image and one at the input size.

The FPN and heads below are the reference maths as ordinary NCHW modules. ``set_fast_decoder(True)`` runs the same
parameters through a channels-last implementation made for CPUs (``layers/fast_decoder.py``; equal results).

State-dict keys, shapes and order are the original's, so released checkpoints load with ``strict=True``.
Shapes below use: N batch, C channels, p patch, G = H / p token grid side, L = G * G, D encoder width,
Dd decoder width.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from layers import fast_decoder
from layers.common import Norm2d, maybe_checkpoint, unsafe_patch_embed
from util.gsd import ResLike, absolute_res, as_res, rescale_res
from util.pos_embed import gsd_sincos_pos_embed, sincos_pos_embed_table
from util.weights import KNOWN_ARCHS, count_blocks, encoder_name

__all__ = [
    "MaskedAutoencoderViT",
    "mae_vit_tiny_patch16",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14_dec512d8b",
    "MODELS",
    "unsafe_patch_embed",
    "Norm2d",
    "FPNHead",
    "HFFB",
    "FCNHead",
]

def _upsample2x(dim: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)


class FPNHead(nn.Module):
    """Two decoder feature maps at 4x and 2x the token grid.

    Default: ``fpn1`` = up2 -> Norm2d -> GELU -> up2 (own weights), ``fpn2`` = up2.
    ``progressive``: ``fpn1`` = Norm2d -> GELU -> up2 applied on ``fpn2``'s output (shares the first upsampling).
    """

    def __init__(self, dim: int, progressive: bool = False):
        super().__init__()
        self.progressive = progressive
        if progressive:
            self.fpn1 = nn.Sequential(Norm2d(dim), nn.GELU(), _upsample2x(dim))
        else:
            self.fpn1 = nn.Sequential(_upsample2x(dim), Norm2d(dim), nn.GELU(), _upsample2x(dim))
        self.fpn2 = nn.Sequential(_upsample2x(dim))
        self.grad_checkpointing = False  # read by the model (and the fast path), which checkpoints the whole FPN

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, Dd, G, G] -> (fine [N, Dd, 4G, 4G], coarse [N, Dd, 2G, 2G])"""
        coarse = self.fpn2(x)
        fine = self.fpn1(coarse if self.progressive else x)
        return fine, coarse


class HFFB(nn.Module):
    """Residual conv block of the reconstruction heads: ``convs(x) + residual(x)``.

    convs = GELU -> 3x3 depthwise-pair conv (dim -> dim/2, groups dim/2) -> GELU -> 1x1 (dim/2 -> dim).
    """

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.convs = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(dim, half, kernel_size=3, padding=1, groups=half),
            nn.GELU(),
            nn.Conv2d(half, dim, kernel_size=1),
        )
        self.residual = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, dim, h, w] -> [N, dim, h, w]"""
        return self.convs(x) + self.residual(x)


class FCNHead(nn.Module):
    """A "Laplacian block": feature mapping + learnable x8 upsampling to ``out_chans`` pixels.

    proj (1x1 in -> dim) -> ``num_layers`` x HFFB -> pred: Norm2d -> ConvT k4 s4 (dim -> dim/2) -> GELU ->
    3x3 grouped conv (dim/2 -> dim/4, groups dim/4) -> GELU -> 1x1 (dim/4 -> dim/2) -> GELU -> ConvT k2 s2
    (dim/2 -> out_chans).
    """

    # checkpoint segments of ``pred`` under gradient checkpointing: [Norm2d .. grouped conv, GELU] [1x1, GELU, ConvT]
    PRED_STAGES = ((0, 5), (5, 8))

    def __init__(self, in_dim: int, dim: int, num_layers: int, out_chans: int):
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.conv_blocks = nn.Sequential(*[HFFB(dim) for _ in range(num_layers)])
        self.pred = nn.Sequential(
            Norm2d(dim),
            nn.ConvTranspose2d(dim, half, kernel_size=4, stride=4),
            nn.GELU(),
            nn.Conv2d(half, quarter, kernel_size=3, padding=1, groups=quarter),
            nn.GELU(),
            nn.Conv2d(quarter, half, kernel_size=1),
            nn.GELU(),
            nn.ConvTranspose2d(half, out_chans, kernel_size=2, stride=2),
        )
        self.grad_checkpointing = False

    def _pred_range(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i in range(start, end):
            x = self.pred[i](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim, h, w] -> image [N, out_chans, 8h, 8w]"""
        ckpt = self.grad_checkpointing
        x = self.proj(x)
        for block in self.conv_blocks:
            x = maybe_checkpoint(ckpt, block, x)
        for start, end in self.PRED_STAGES:
            x = maybe_checkpoint(ckpt, self._pred_range, x, start, end)
        return x


def _square_side(x: torch.Tensor, name: str) -> int:
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must be a square batch [N, C, S, S], got shape {tuple(x.shape)}")
    return x.shape[-1]


class MaskedAutoencoderViT(nn.Module):
    """Scale-MAE pretraining model.

    Every constructor keyword of the original is accepted; the defaults are the original ``main_pretrain.py``
    command-line defaults (the released configuration), not its constructor defaults. Keywords the original
    stores but never reads are accepted as documented no-ops: ``decoder_aux_loss_layers``, ``norm_pix_loss``,
    ``loss_masking``, ``self_attention``, ``target_size`` and ``fixed_output_size``.
    ``band_config[1]`` only matters when it equals 224 (the original's two-step low-band target).

    Extension: ``in_chans`` other than 3 works end to end (the heads reconstruct ``in_chans`` channels).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 3,
        decoder_num_heads: int = 16,
        decoder_aux_loss_layers: int = 1,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] | partial = partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss: bool = False,
        use_mask_token: bool = True,
        project_pos_emb: bool = False,
        loss_masking: bool = True,
        self_attention: bool = False,
        absolute_scale: bool = False,
        target_size: Sequence[int] = (448,),
        fixed_output_size: int = 0,
        fcn_dim: int = 512,
        fcn_layers: int = 2,
        independent_fcn_head: bool = True,
        use_l1_loss: bool = False,
        l1_loss_weight: float = 1.0,
        band_config: Sequence[int] = (7, 56),
        progressive: bool = False,
    ):
        super().__init__()
        if not use_mask_token:
            raise ValueError(
                "use_mask_token=False is not supported: the decoder needs mask tokens to rebuild the full patch grid "
                "(the original crashes on this path); use the default use_mask_token=True"
            )
        if project_pos_emb:
            raise ValueError(
                "project_pos_emb=True is not supported: the original's projection path is broken (it references an "
                "undefined name) and no released weights use it; leave project_pos_emb=False"
            )
        if embed_dim % 4 or decoder_embed_dim % 4:
            raise ValueError(
                f"embed_dim ({embed_dim}) and decoder_embed_dim ({decoder_embed_dim}) must be divisible by 4"
            )
        if len(band_config) != 2:
            raise ValueError(f"band_config must be [dim1, dim2], got {list(band_config)}")

        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.absolute_scale = absolute_scale
        self.use_l1_loss = use_l1_loss
        self.l1_loss_weight = l1_loss_weight
        self.band_config = tuple(int(b) for b in band_config)
        self.independent_fcn_head = independent_fcn_head
        num_patches = (img_size // patch_size) ** 2

        # Parameter registration order is the original's (it fixes state-dict and optimizer-state order).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Stored but unused: forward recomputes the GSD table. Kept for strict loading of original checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.mask_token_decoder = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))  # unused (original dead path)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)

        self.patch_embed = unsafe_patch_embed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.fpn = FPNHead(decoder_embed_dim, progressive=progressive)
        if independent_fcn_head:
            self.fcn_high = FCNHead(decoder_embed_dim, fcn_dim, fcn_layers, in_chans)
            self.fcn_low = FCNHead(decoder_embed_dim, fcn_dim, fcn_layers, in_chans)
        else:
            self.fcn = FCNHead(decoder_embed_dim, fcn_dim, fcn_layers, in_chans)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)

        self.grad_checkpointing = False
        self.fast_decoder = False  # reference NCHW decoder; see set_fast_decoder
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """MAE init: res=1 sin-cos table in ``pos_embed``, xavier patch/linear weights, N(0, .02) tokens.

        Conv layers of the FPN and heads keep PyTorch's default init, as in the original.
        """
        grid = int(round((self.pos_embed.shape[1] - 1) ** 0.5))
        self.pos_embed.data.copy_(sincos_pos_embed_table(self.pos_embed.shape[-1], grid, cls_token=True))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay by timm-style optimizers (none: the original decays every >=2-D tensor)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True, scope: str = "all") -> None:
        """Recompute activations in backward instead of storing them (less memory, more time).

        scope ``"all"``: encoder and decoder blocks, the FPN and the reconstruction heads; ``"heads"``: only the two
        reconstruction heads (the full-resolution maps, most of the activation memory, at a small time cost).
        """
        if scope not in ("all", "heads"):
            raise ValueError(f"grad checkpointing scope must be 'all' or 'heads', got {scope!r}")
        everything = enable and scope == "all"
        self.grad_checkpointing = everything
        self.fpn.grad_checkpointing = everything
        for module in self.modules():
            if isinstance(module, FCNHead):
                module.grad_checkpointing = enable

    def set_fast_decoder(self, enable: bool = True) -> None:
        """Run the FPN and heads through ``layers.fast_decoder`` (channels-last kernels for CPU; same parameters and
        results) instead of the reference NCHW modules."""
        self.fast_decoder = bool(enable)

    # -------------------------------------------------------------------------------------------- helpers
    def _pred_patch(self, side: int, grid: int) -> int:
        """Patch side used to patchify a ``side``-px prediction: p, or the per-token side when p does not divide it."""
        return self.patch_size if side % self.patch_size == 0 else side // grid

    def patchify(self, imgs: torch.Tensor, patch: Optional[int] = None) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, (H/q)*(W/q), q*q*C] with q = ``patch`` (default the model's p)."""
        q = patch or self.patch_size
        n, c, h, w = imgs.shape
        if h % q or w % q:
            raise ValueError(f"cannot patchify a {h}x{w} image with patch {q}")
        x = imgs.reshape(n, c, h // q, q, w // q, q)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // q) * (w // q), q * q * c)

    def unpatchify(self, x: torch.Tensor, patch: Optional[int] = None, channels: Optional[int] = None) -> torch.Tensor:
        """x: [N, L, q*q*C] -> imgs [N, C, sqrt(L)*q, sqrt(L)*q]"""
        q = patch or self.patch_size
        c = channels or self.in_chans
        g = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], g, g, q, q, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * q, g * q)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """MAE per-sample random masking by argsort of uniform noise.

        x: [N, L, D]; noise: [N, L] (drawn with ``torch.rand`` when None).
        Returns x_masked [N, L_keep, D], mask [N, L] (1 = removed, original order), ids_restore [N, L].
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = maybe_checkpoint(self.grad_checkpointing, blk, x)
        return x

    # ------------------------------------------------------------------------------------------- encoder
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, input_res: torch.Tensor, noise: Optional[torch.Tensor] = None
    ):
        """Masked GSD-aware encoder.

        imgs: [N, C, H, H]; input_res: [N] (or [1], shared by the batch).
        Returns latent [N, 1 + L_keep, D] (after the final norm), mask [N, L], ids_restore [N, L],
        pos_embed_encoder [N, 1 + L, Dd] (the decoder-width GSD table of the same grid and res).
        """
        n = imgs.shape[0]
        x = self.patch_embed(imgs)  # [N, L, D]
        grid = imgs.shape[-1] // self.patch_size
        pos = gsd_sincos_pos_embed(x.shape[-1], grid, input_res).to(x.dtype)  # [N or 1, 1 + L, D]
        x = x + pos[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + pos[:, :1]).to(x.dtype).expand(n, -1, -1)  # the cls row of the table is zero
        x = torch.cat([cls, x], dim=1)
        x = self.norm(self._run_blocks(self.blocks, x))
        pos_embed_encoder = gsd_sincos_pos_embed(self.decoder_embed.out_features, grid, input_res)
        return x, mask, ids_restore, pos_embed_encoder.expand(n, -1, -1)

    # ------------------------------------------------------------------------------------------- decoder
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, pos_embed_encoder: torch.Tensor):
        """Un-shuffle, GSD embedding of the input grid, transformer blocks, FPN and the two heads.

        latent: [N, 1 + L_keep, D]; ids_restore: [N, L]; pos_embed_encoder: [N, 1 + L, Dd].
        Returns pred_high [N, C, 32G, 32G], pred_low [N, C, 16G, 16G].
        """
        x = self.decoder_embed(latent)  # [N, 1 + L_keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + pos_embed_encoder.to(x.dtype)
        x = x[:, 1:]  # the decoder works on patch tokens only (cls dropped)
        x = self.decoder_norm(self._run_blocks(self.decoder_blocks, x))  # [N, L, Dd]
        grid = int(round(length**0.5))
        tokens_map = x.reshape(n, grid, grid, -1)  # [N, G, G, Dd]: the tokens already are a channels-last map
        if self.fast_decoder:
            return fast_decoder.decode(self, tokens_map)
        feats = tokens_map.permute(0, 3, 1, 2)  # [N, Dd, G, G]
        fine, coarse = maybe_checkpoint(self.fpn.grad_checkpointing, self.fpn, feats)
        if self.independent_fcn_head:
            return self.fcn_high(fine), self.fcn_low(coarse)
        return self.fcn(fine), self.fcn(coarse)

    # ---------------------------------------------------------------------------------------------- loss
    def band_targets(self, targets: torch.Tensor, low_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the high-resolution image into the two reconstruction targets.

        targets: [N, C, T, T]. high = targets - bilinear_up(area_down(targets, dim1)); low = area_down(targets,
        low_size) (via 224 first when ``band_config[1] == 224``, as the original does).
        Returns target_high [N, C, T, T], target_low [N, C, low_size, low_size].
        """
        dim1, dim2 = self.band_config
        side = targets.shape[-1]
        blurred = F.interpolate(
            F.interpolate(targets, size=(dim1, dim1), mode="area"), size=(side, side), mode="bilinear",
            align_corners=False,
        )
        target_high = targets - blurred
        source = F.interpolate(targets, size=(224, 224), mode="area") if dim2 == 224 else targets
        target_low = F.interpolate(source, size=(low_size, low_size), mode="area")
        return target_high, target_low

    def forward_loss(
        self, targets: torch.Tensor, pred_high: torch.Tensor, pred_low: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Masked band loss: per masked pixel, the error summed over channels, averaged over masked pixels.

        targets: [N, C, T, T]; pred_high: [N, C, T, T]; pred_low: [N, C, T/2, T/2]; mask: [N, L] (1 = removed).
        High band: squared error, or ``l1_loss_weight * |error|`` with ``use_l1_loss``; low band: squared error.
        """
        target_high, target_low = self.band_targets(targets, pred_low.shape[-1])
        err_high = target_high - pred_high
        err_high = err_high.abs() * self.l1_loss_weight if self.use_l1_loss else err_high.square()
        loss_high = self._masked_mean(err_high, mask)
        loss_low = self._masked_mean((target_low - pred_low).square(), mask)
        return loss_high + loss_low

    @staticmethod
    def _masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum(err * up(mask)) / (sum(up(mask)) + 1e-9), ``up`` = nearest upsampling of the token mask.

        err: [N, C, S, S] with S a multiple of the grid G; mask: [N, L = G*G]. Summing each token's pixels first
        gives the original's value without building the full-size mask and product.
        """
        n, _, side, _ = err.shape
        grid = int(round(mask.shape[1] ** 0.5))
        cell = side // grid
        per_token = err.sum(1).reshape(n, grid, cell, grid, cell).sum((2, 4)).reshape(n, grid * grid)
        mask = mask.to(per_token.dtype)
        return (per_token * mask).sum() / (mask.sum() * cell * cell + 1e-9)

    def combine_bands(self, pred_high: torch.Tensor, pred_low: torch.Tensor) -> torch.Tensor:
        """Full image from the two bands: bilinear_up(area_down(pred_low, dim1)) + pred_high: [N, C, T, T]."""
        dim1 = self.band_config[0]
        low = F.interpolate(pred_low, size=(dim1, dim1), mode="area")
        return F.interpolate(low, size=pred_high.shape[-2:], mode="bilinear", align_corners=False) + pred_high

    # ------------------------------------------------------------------------------------------- forward
    def _apply_source_size(self, imgs, targets, input_res, target_res, source_size):
        """Area-downsample the encoder input (and the targets by the same factor); res follows the pixel size
        (``util.gsd.rescale_res``)."""
        if isinstance(source_size, (list, tuple)):
            source_size = source_size[0]
        source_size = int(source_size)
        side = imgs.shape[-1]
        if source_size % self.patch_size or source_size > side:
            raise ValueError(
                f"source_size must be a multiple of the patch size ({self.patch_size}) and at most the input size "
                f"({side}); got {source_size}"
            )
        if source_size == side:
            return imgs, targets, input_res, target_res
        imgs = F.interpolate(imgs, size=(source_size, source_size), mode="area")
        input_res = rescale_res(input_res, side, source_size)
        if targets is not None:
            target_side = targets.shape[-1]
            new_target = int(target_side * source_size / side)
            # The original resized the already-downsampled input here; the real targets are what must be used.
            targets = F.interpolate(targets, size=(new_target, new_target), mode="area")
            target_res = rescale_res(target_res, target_side, new_target)
        return imgs, targets, input_res, target_res

    def forward(
        self,
        imgs: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        mask_ratio: float = 0.75,
        knn_feats: bool = False,
        input_res: ResLike = None,
        target_res: ResLike = None,
        source_size: Optional[Union[int, Sequence[int]]] = None,
        noise: Optional[torch.Tensor] = None,
        loss_only: bool = False,
    ):
        """Masked reconstruction (or kNN features).

        Args:
            imgs: encoder input [N, C, H, H].
            targets: high-resolution image [N, C, 32G, 32G] (2x the input at p = 16).
            mask_ratio: fraction of patch tokens removed.
            knn_feats: return the cls token after the final norm, [N, D], of the unmasked encoder.
            input_res / target_res: relative GSD, per sample [N] or one number for the batch (None means 1).
            source_size: optional smaller encoder input side (multiple of p); input and targets are area-resized.
            noise: [N, L] uniform noise deciding the masking (argsort ascending, keep the smallest).
            loss_only: return only the loss (what a training step needs), skipping the recombined image, the
                patchified predictions and the unused target-grid table that the full return value carries.

        Returns:
            ``(loss, [pred_high, pred_low, pred_all], mask, 0, 1, pos_embed_encoder, pos_embed_decoder, imgs)``
            with preds patchified ``[N, L_out, q*q*C]``, mask [N, L] (1 = removed), pos_embed_encoder
            [N, 1 + L, Dd], pos_embed_decoder [N, 1 + (T/p)^2, Dd] (returned for compatibility; unused);
            with ``loss_only`` the loss alone.
        """
        side = _square_side(imgs, "imgs")
        n = imgs.shape[0]
        input_res = as_res(input_res, n, imgs)
        target_res = as_res(target_res, n, imgs)
        if source_size is not None:
            imgs, targets, input_res, target_res = self._apply_source_size(
                imgs, targets, input_res, target_res, source_size
            )
            side = imgs.shape[-1]
        input_res = absolute_res(input_res, self.absolute_scale)
        target_res = absolute_res(target_res, self.absolute_scale)

        if knn_feats:
            latent, _, _, _ = self.forward_encoder(imgs, 0.0, input_res, noise)
            return latent[:, 0]

        if targets is None:
            raise ValueError("targets (the high-resolution image) are required unless knn_feats=True")
        grid = side // self.patch_size
        expected = 32 * grid
        if _square_side(targets, "targets") != expected or targets.shape[1] != self.in_chans:
            raise ValueError(
                f"targets must be [N, {self.in_chans}, {expected}, {expected}] for a {side}px input at patch "
                f"{self.patch_size} (32 x the {grid}x{grid} token grid), got {tuple(targets.shape)}"
            )

        latent, mask, ids_restore, pos_embed_encoder = self.forward_encoder(imgs, mask_ratio, input_res, noise)
        pred_high, pred_low = self.forward_decoder(latent, ids_restore, pos_embed_encoder)
        loss = self.forward_loss(targets, pred_high, pred_low, mask)
        if loss_only:
            return loss
        pred_all = self.combine_bands(pred_high, pred_low)

        pos_embed_decoder = gsd_sincos_pos_embed(
            self.decoder_embed.out_features, targets.shape[-1] // self.patch_size, target_res
        ).expand(imgs.shape[0], -1, -1)
        preds = [self.patchify(p, self._pred_patch(p.shape[-1], grid)) for p in (pred_high, pred_low, pred_all)]
        return loss, preds, mask, 0, 1, pos_embed_encoder, pos_embed_decoder, imgs


def _mae(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> MaskedAutoencoderViT:
    defaults = dict(decoder_embed_dim=512, decoder_num_heads=16, mlp_ratio=4,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6))
    defaults.update(kwargs)
    return MaskedAutoencoderViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                **defaults)


def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    """Tiny demo/test model (ours, not in the original): ViT 192-d, 4 blocks, 3 heads; decoder 128-d, 4 heads;
    FCN heads 64-d. Trains on a laptop CPU."""
    kwargs = {"decoder_embed_dim": 128, "decoder_num_heads": 4, "decoder_depth": 2, "fcn_dim": 64, **kwargs}
    return _mae(16, 192, 4, 3, **kwargs)


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768-d, 12 blocks, 12 heads), 512-d decoder with 16 heads."""
    return _mae(16, 768, 12, 12, **kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024-d, 24 blocks, 16 heads), 512-d decoder: the released Scale-MAE architecture."""
    return _mae(16, 1024, 24, 16, **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280-d, 32 blocks, 16 heads), 512-d decoder."""
    return _mae(14, 1280, 32, 16, **kwargs)


# The original's names (the decoder depth is not fixed by them: it comes from ``decoder_depth``).
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14

def infer_architecture(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Factory name and constructor kwargs that rebuild the model a pretraining state dict came from.

    Reads the tensor shapes (encoder width, depth, patch, channels, decoder width/depth, head layout), so that a
    checkpoint can be evaluated without knowing its ``--model``. Raises ``ValueError`` for an encoder that matches no
    factory.
    """
    try:
        patch_w = state_dict["patch_embed.proj.weight"]
        dec_w = state_dict["decoder_embed.weight"]
    except KeyError as err:
        raise ValueError(f"not a Scale-MAE pretraining state dict: key {err} is missing") from None

    embed_dim, in_chans, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    depth = count_blocks(state_dict)
    encoder = encoder_name(patch, embed_dim, depth)  # the one shape table (util/weights.py)
    if encoder is None:
        factories = sorted(f"mae_{v[1]}" for v in KNOWN_ARCHS.values() if v[1] is not None)
        raise ValueError(
            f"checkpoint encoder (patch {patch}, width {embed_dim}, depth {depth}) matches no factory in "
            f"{factories}; pass --model and the model options explicitly"
        )
    name = f"mae_{encoder}"
    independent = any(k.startswith("fcn_high.") for k in state_dict)
    head = "fcn_high." if independent else "fcn."
    kwargs = dict(
        in_chans=in_chans,
        decoder_embed_dim=dec_w.shape[0],
        decoder_depth=count_blocks(state_dict, "decoder_blocks."),
        fcn_dim=state_dict[head + "proj.weight"].shape[0],
        fcn_layers=count_blocks(state_dict, head + "conv_blocks."),
        independent_fcn_head=independent,
        progressive="fpn.fpn1.0.ln.weight" in state_dict,
        img_size=int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)) * patch,
    )
    return name, kwargs  # head counts do not change shapes: the factories' values are assumed


MODELS = {
    "mae_vit_tiny_patch16": mae_vit_tiny_patch16,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
    "mae_vit_base_patch16_dec512d8b": mae_vit_base_patch16_dec512d8b,
    "mae_vit_large_patch16_dec512d8b": mae_vit_large_patch16_dec512d8b,
    "mae_vit_huge_patch14_dec512d8b": mae_vit_huge_patch14_dec512d8b,
}
