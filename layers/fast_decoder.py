"""Channels-last fast path of the Scale-MAE decoder's convolutional part (FPN and reconstruction heads).

The reference maths lives in ``models_mae.py`` (``FPNHead``, ``HFFB``, ``FCNHead``: ordinary NCHW modules). This
module computes the same thing from the same parameters on channels-last maps ``[N, H, W, C]`` -- the layout the
decoder's tokens already have -- with kernels that suit CPUs:

* a 1x1 conv is a matmul over the last dim;
* a transposed conv with kernel == stride is a matmul to the k*k sub-pixels of each input pixel followed by a pixel
  shuffle; when GELU follows, the shuffle and the GELU are one pass (``scalemae::shuffle_gelu``);
* a grouped conv whose groups each give one output is a depthwise conv plus a sum of each group's channels
  (``scalemae::pair_sum`` / ``scalemae::halves_sum``, with hand-written backwards);
* ``Norm2d`` is a plain LayerNorm over the last dim (no permutes).

Switch it on with ``set_fast_decoder(model, True)`` (``MaskedAutoencoderViT.set_fast_decoder``); the launchers do so
on CPU (``--fast_decoder auto``). Both paths are compile-safe: the fused pieces are ``torch.library.custom_op``s
with fake kernels (dynamo traces them as single opaque ops, no graph break), and nothing writes into a view of a
permuted result outside those ops' eager kernels. Equality with the reference (forward and every gradient) is
tested in ``tests/test_fast_decoder.py``; timings are in ``bench/``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers.common import Norm2d, maybe_checkpoint

__all__ = ["shuffle_gelu", "pair_sum", "halves_sum", "conv_transpose_nhwc", "apply_nhwc", "run_nhwc",
           "fpn_forward", "fcn_forward", "decode"]


# ------------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("scalemae::shuffle_gelu", mutates_args=())
def shuffle_gelu(y: torch.Tensor) -> torch.Tensor:
    """GELU of a transposed conv's matmul rows, written straight into the pixel-shuffled layout.

    y: [N, h, w, k, k, C] -> exact GELU(y) as [N, h*k, w*k, C] (one pass instead of a shuffle copy then a GELU).
    """
    n, h, w, k, _, c = y.shape
    out = y.new_empty(n, h * k, w * k, c)
    # ``out`` is freshly allocated and contiguous, so this view aliases it exactly (eager kernel only)
    torch.ops.aten.gelu.out(y.permute(0, 1, 3, 2, 4, 5), out=out.view(n, h, k, w, k, c))
    return out


@shuffle_gelu.register_fake
def _shuffle_gelu_fake(y: torch.Tensor) -> torch.Tensor:
    n, h, w, k, _, c = y.shape
    return y.new_empty(n, h * k, w * k, c)


@torch.library.custom_op("scalemae::shuffle_gelu_backward", mutates_args=())
def shuffle_gelu_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of ``shuffle_gelu`` w.r.t. y: grad [N, h*k, w*k, C], y [N, h, w, k, k, C] -> [N, h, w, k, k, C]."""
    n, h, w, k, _, c = y.shape
    grad_y = torch.empty_like(y, memory_format=torch.contiguous_format)
    torch.ops.aten.gelu_backward.grad_input(grad.reshape(n, h, k, w, k, c).permute(0, 1, 3, 2, 4, 5), y,
                                            grad_input=grad_y)
    return grad_y


@shuffle_gelu_backward.register_fake
def _shuffle_gelu_backward_fake(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _shuffle_gelu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _shuffle_gelu_grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    (y,) = ctx.saved_tensors
    return shuffle_gelu_backward(grad, y)


shuffle_gelu.register_autograd(_shuffle_gelu_grad, setup_context=_shuffle_gelu_setup)


def _half_shape(y: torch.Tensor) -> tuple[int, ...]:
    return (*y.shape[:-1], y.shape[-1] // 2)


@torch.library.custom_op("scalemae::pair_sum", mutates_args=())
def pair_sum(y: torch.Tensor) -> torch.Tensor:
    """``y[..., 0::2] + y[..., 1::2]``: [..., 2C] -> [..., C] (a strided add instead of a reduction kernel)."""
    out = y.new_empty(_half_shape(y))
    return torch.add(y[..., 0::2], y[..., 1::2], out=out)


@pair_sum.register_fake
def _pair_sum_fake(y: torch.Tensor) -> torch.Tensor:
    return y.new_empty(_half_shape(y))


def _pair_sum_grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    # both members of a pair receive the gradient: one pass, not autograd's zero-filled buffer per slice
    return grad.unsqueeze(-1).expand(*grad.shape, 2).reshape(*grad.shape[:-1], 2 * grad.shape[-1])


pair_sum.register_autograd(_pair_sum_grad)


@torch.library.custom_op("scalemae::halves_sum", mutates_args=())
def halves_sum(y: torch.Tensor) -> torch.Tensor:
    """``y[..., :C] + y[..., C:]``: [..., 2C] -> [..., C]."""
    half = y.shape[-1] // 2
    out = y.new_empty(_half_shape(y))
    return torch.add(y[..., :half], y[..., half:], out=out)


@halves_sum.register_fake
def _halves_sum_fake(y: torch.Tensor) -> torch.Tensor:
    return y.new_empty(_half_shape(y))


def _halves_sum_grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    return torch.cat([grad, grad], dim=-1)


halves_sum.register_autograd(_halves_sum_grad)


# ------------------------------------------------------------------------------------------- layer kernels
def conv_transpose_nhwc(layer: nn.ConvTranspose2d, x: torch.Tensor, gelu: bool = False,
                        out_order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A kernel == stride transposed conv (optionally followed by exact GELU) on x: [N, h, w, C_in] ->
    [N, k*h, k*w, C_out]: a matmul to the k*k sub-pixels of every input pixel, then a pixel shuffle.
    ``out_order`` permutes the output channels (free: it reorders the weight's rows)."""
    k = layer.kernel_size[0]
    if layer.stride != (k, k) or layer.padding != (0, 0) or layer.groups != 1 or layer.output_padding != (0, 0):
        raise ValueError(f"the channels-last decoder expects kernel == stride transposed convs, got {layer}")
    c_out = layer.weight.shape[1]
    weight = layer.weight.permute(2, 3, 1, 0)  # [k, k, out, in]: rows ordered (i, j, out)
    bias = layer.bias
    if out_order is not None:
        weight = weight[:, :, out_order]
        bias = bias[out_order] if bias is not None else None
    weight = weight.reshape(k * k * c_out, layer.weight.shape[0])
    bias = bias.repeat(k * k) if bias is not None else None
    n, h, w, _ = x.shape
    y = F.linear(x, weight, bias).view(n, h, w, k, k, c_out)
    if gelu:
        return shuffle_gelu(y)
    return y.permute(0, 1, 3, 2, 4, 5).reshape(n, h * k, w * k, c_out)


def _pairs_first_order(channels: int, device: torch.device) -> torch.Tensor:
    """Channel order that puts the first member of every (2g, 2g+1) pair first: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.arange(channels, device=device).view(-1, 2).t().reshape(-1)


def _grouped_conv_as_depthwise(layer: nn.Conv2d, x: torch.Tensor,
                               pairs_first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A grouped conv whose groups each make one output (``out_channels == groups``) on x: [N, H, W, C_in].

    Computed as a depthwise conv and a sum of each group's channels. ``pairs_first``: the channel order of x when
    it is ``_pairs_first_order`` (the two inputs of every group in separate halves), so that the pair sum adds two
    contiguous halves.
    """
    groups, c_in = layer.groups, layer.in_channels
    per_group = c_in // groups
    depthwise = layer.weight.reshape(c_in, 1, *layer.kernel_size)
    if pairs_first is not None:
        depthwise = depthwise[pairs_first]
    y = F.conv2d(x.permute(0, 3, 1, 2), depthwise, None, layer.stride, layer.padding, layer.dilation, c_in)
    y = y.permute(0, 2, 3, 1)
    if pairs_first is not None:
        y = halves_sum(y)
    elif per_group == 2:
        y = pair_sum(y)
    else:
        y = y.reshape(*y.shape[:3], groups, per_group).sum(-1)
    return y + layer.bias if layer.bias is not None else y


def _is_pair_conv(layer: Optional[nn.Module]) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.out_channels == layer.groups
            and layer.in_channels == 2 * layer.groups)


def _is_exact_gelu(layer: nn.Module) -> bool:
    return isinstance(layer, nn.GELU) and layer.approximate == "none"


def apply_nhwc(layer: nn.Module, x: torch.Tensor, lean: bool = False) -> torch.Tensor:
    """Apply one decoder layer to a channels-last map x: [N, H, W, C].

    ``lean`` (set under gradient checkpointing) keeps the grouped convs on the native kernel, which is slower but
    does not materialise the depthwise intermediate (2x the output).
    """
    if isinstance(layer, nn.ConvTranspose2d):
        return conv_transpose_nhwc(layer, x)
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size == (1, 1) and layer.groups == 1:
            return F.linear(x, layer.weight.flatten(1), layer.bias)
        if layer.groups > 1 and layer.out_channels == layer.groups and not lean:
            return _grouped_conv_as_depthwise(layer, x)
        return layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if isinstance(layer, Norm2d):
        return layer.ln(x)
    return layer(x)  # element-wise layers (GELU)


def run_nhwc(layers: nn.Sequential, x: torch.Tensor, lean: bool = False, start: int = 0,
             end: Optional[int] = None) -> torch.Tensor:
    """Apply ``layers[start:end]`` to x: [N, H, W, C] channels-last; a transposed conv followed by GELU runs fused,
    and fused with the pair-first channel order when a pair conv follows (unless ``lean``)."""
    end = len(layers) if end is None else end
    i = start
    while i < end:
        layer = layers[i]
        if isinstance(layer, nn.ConvTranspose2d) and i + 1 < end and _is_exact_gelu(layers[i + 1]):
            after = layers[i + 2] if i + 2 < end else None
            if not lean and _is_pair_conv(after):
                order = _pairs_first_order(after.in_channels, x.device)
                x = conv_transpose_nhwc(layer, x, gelu=True, out_order=order)
                x = _grouped_conv_as_depthwise(after, x, pairs_first=order)
                i += 3
            else:
                x = conv_transpose_nhwc(layer, x, gelu=True)
                i += 2
            continue
        x = apply_nhwc(layer, x, lean)
        i += 1
    return x


# ---------------------------------------------------------------------------------------- the decoder parts
def fpn_forward(fpn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``models_mae.FPNHead`` channels-last: x [N, G, G, Dd] -> (fine [N, 4G, 4G, Dd], coarse [N, 2G, 2G, Dd])."""
    coarse = run_nhwc(fpn.fpn2, x)
    fine = run_nhwc(fpn.fpn1, coarse if fpn.progressive else x)
    return fine, coarse


def _hffb_forward(block: nn.Module, x: torch.Tensor, lean: bool) -> torch.Tensor:
    """``models_mae.HFFB`` channels-last: x [N, h, w, dim] -> [N, h, w, dim]."""
    return run_nhwc(block.convs, x, lean) + apply_nhwc(block.residual, x)


def fcn_forward(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``models_mae.FCNHead`` channels-last: x [N, h, w, in_dim] -> image [N, out_chans, 8h, 8w] (NCHW view of a
    channels-last tensor). Checkpoints the same segments as the reference when ``head.grad_checkpointing``."""
    ckpt = head.grad_checkpointing
    x = apply_nhwc(head.proj, x)
    for block in head.conv_blocks:
        x = maybe_checkpoint(ckpt, _hffb_forward, block, x, ckpt)
    for start, end in head.PRED_STAGES:
        x = maybe_checkpoint(ckpt, run_nhwc, head.pred, x, ckpt, start, end)
    return x.permute(0, 3, 1, 2)


def decode(model: nn.Module, tokens_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FPN and reconstruction heads of a ``MaskedAutoencoderViT`` on the decoder's token map.

    tokens_map: [N, G, G, Dd] (channels last). Returns pred_high [N, C, 32G, 32G], pred_low [N, C, 16G, 16G].
    """
    fine, coarse = maybe_checkpoint(model.fpn.grad_checkpointing, fpn_forward, model.fpn, tokens_map)
    if model.independent_fcn_head:
        return fcn_forward(model.fcn_high, fine), fcn_forward(model.fcn_low, coarse)
    return fcn_forward(model.fcn, fine), fcn_forward(model.fcn, coarse)
