"""The channels-last fast decoder (layers/fast_decoder.py) computes what the reference NCHW modules compute:
forward values and every gradient, with and without gradient checkpointing, and its custom ops are well formed
(fake kernels and autograd registrations pass ``torch.library.opcheck``)."""
from __future__ import annotations

import pytest
import torch

from layers import fast_decoder


def _batch(side=64, n=2, chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = side // 16
    return (torch.randn(n, chans, side, side, generator=g), torch.randn(n, chans, 32 * grid, 32 * grid, generator=g),
            torch.rand(n, grid * grid, generator=g))


def _run(model, imgs, targets, noise):
    model.zero_grad(set_to_none=True)
    loss, preds, *_ = model(imgs, targets, noise=noise, input_res=torch.tensor([0.5, 2.0]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), [p.detach() for p in preds], grads


@pytest.mark.parametrize("overrides", [{}, {"progressive": True}, {"independent_fcn_head": False},
                                       {"fcn_dim": 32, "in_chans": 6}])
@pytest.mark.parametrize("scope", [None, "all", "heads"])
def test_fast_decoder_equals_the_reference_forward_and_every_gradient(tiny_mae, overrides, scope):
    model = tiny_mae(**overrides)
    if scope is not None:
        model.set_grad_checkpointing(True, scope=scope)
    imgs, targets, noise = _batch(chans=overrides.get("in_chans", 3))
    assert not model.fast_decoder  # the reference is the default
    ref_loss, ref_preds, ref_grads = _run(model, imgs, targets, noise)
    model.set_fast_decoder(True)
    loss, preds, grads = _run(model, imgs, targets, noise)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(preds, ref_preds):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads) and any(name.endswith("pred.3.weight") for name in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("lean", [False, True])
def test_fast_head_input_gradient_equals_the_reference(tiny_mae, lean):
    """The head alone, channels-last vs NCHW, including the gradient w.r.t. its input (patch 8: other shapes)."""
    head = tiny_mae(patch_size=8).fcn_high
    head.grad_checkpointing = lean
    x = torch.randn(2, 16, 8, 8)
    weight = torch.randn(2, 3, 64, 64)
    x_ref = x.clone().requires_grad_(True)
    (head(x_ref) * weight).sum().backward()
    ref = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad(set_to_none=True)
    x_fast = x.permute(0, 2, 3, 1).clone().requires_grad_(True)
    (fast_decoder.fcn_forward(head, x_fast) * weight).sum().backward()
    torch.testing.assert_close(x_fast.grad.permute(0, 3, 1, 2), x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_custom_ops_pass_opcheck():
    """Fake kernels, schemas and autograd registrations are consistent (what torch.compile relies on)."""
    y6 = torch.randn(2, 3, 3, 2, 2, 4, requires_grad=True)
    torch.library.opcheck(fast_decoder.shuffle_gelu, (y6,))
    y = torch.randn(2, 3, 3, 8, requires_grad=True)
    torch.library.opcheck(fast_decoder.pair_sum, (y,))
    torch.library.opcheck(fast_decoder.halves_sum, (y,))


def test_custom_ops_values():
    y = torch.randn(2, 3, 3, 2, 2, 4)
    shuffled = y.permute(0, 1, 3, 2, 4, 5).reshape(2, 6, 6, 4)
    torch.testing.assert_close(fast_decoder.shuffle_gelu(y), torch.nn.functional.gelu(shuffled))
    z = torch.randn(2, 3, 8)
    torch.testing.assert_close(fast_decoder.pair_sum(z), z[..., 0::2] + z[..., 1::2])
    torch.testing.assert_close(fast_decoder.halves_sum(z), z[..., :4] + z[..., 4:])


def test_set_grad_checkpointing_scopes(tiny_mae):
    model = tiny_mae()
    model.set_grad_checkpointing(True, scope="heads")
    assert not model.grad_checkpointing and not model.fpn.grad_checkpointing
    assert model.fcn_high.grad_checkpointing and model.fcn_low.grad_checkpointing
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and model.fpn.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.fcn_high.grad_checkpointing and not model.grad_checkpointing
    with pytest.raises(ValueError, match="scope"):
        model.set_grad_checkpointing(True, scope="encoder")
