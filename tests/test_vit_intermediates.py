"""timm's feature API on the Scale-MAE encoder: ``forward_intermediates`` / ``FeatureGetterNet`` /
``get_intermediate_layers`` carry the GSD positional embedding (grid from the token count, per-sample res)."""
from __future__ import annotations

import pytest
import torch
from timm.models._features import FeatureGetterNet

import models_vit
from util.pos_embed import gsd_sincos_pos_embed


def tiny_vit(depth=4, **kwargs):
    torch.manual_seed(2)
    return models_vit.VisionTransformer(embed_dim=32, depth=depth, num_heads=2, img_size=64, num_classes=0,
                                        **kwargs).eval()


def manual_blocks(model, x, res, take):
    """Block outputs (patch tokens only) computed step by step from the model's parts."""
    grid = x.shape[-1] // 16
    tok = model.patch_embed(x)
    pos = gsd_sincos_pos_embed(tok.shape[-1], grid, res)
    h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tok], dim=1) + pos
    out = {}
    for i, blk in enumerate(model.blocks):
        h = blk(h)
        if i in take:
            out[i] = h[:, 1:]
    return out, model.norm(h)


@pytest.mark.parametrize("side", [64, 96])
def test_intermediates_equal_manual_forward_with_per_sample_res(side):
    model = tiny_vit()
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    res = torch.tensor([0.5, 1.0, 2.5])
    with torch.no_grad():
        ref, final_ref = manual_blocks(model, x, res, (0, 2, 3))
        final, maps = model.forward_intermediates(x, indices=[0, 2, 3], input_res=res)
        tokens = model.forward_intermediates(x, indices=[0, 2, 3], input_res=res, output_fmt="NLC",
                                             intermediates_only=True)
    g = side // 16
    assert [m.shape for m in maps] == [(3, 32, g, g)] * 3
    for m, t, i in zip(maps, tokens, (0, 2, 3)):
        torch.testing.assert_close(t, ref[i], rtol=0, atol=1e-6)
        # NCHW maps are the row-major token grid
        torch.testing.assert_close(m.flatten(2).transpose(1, 2), ref[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(final, model.forward_features(x, input_res=res), rtol=0, atol=1e-6)


def test_changing_one_res_changes_only_that_sample():
    model = tiny_vit()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model.forward_intermediates(x, indices=2, input_res=torch.tensor([1.0, 1.0, 1.0]), intermediates_only=True)
        b = model.forward_intermediates(x, indices=2, input_res=torch.tensor([1.0, 3.0, 1.0]), intermediates_only=True)
    for fa, fb in zip(a, b):
        assert torch.equal(fa[0], fb[0]) and torch.equal(fa[2], fb[2])
        assert (fa[1] - fb[1]).abs().max() > 1e-3


def test_pos_embed_without_grid_uses_the_full_table():
    """The hook as timm's own code calls it (tokens only) must add the real table, not the zero cls row."""
    model = tiny_vit()
    tok = torch.randn(2, 16, 32)
    out = model._pos_embed(tok)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), tok], 1) + gsd_sincos_pos_embed(32, 4, torch.ones(1))
    torch.testing.assert_close(out, expected)
    assert (out[:, 2:] - tok[:, 1:]).abs().max() > 0.1  # positions other than 0 got a non-zero embedding
    with pytest.raises(ValueError, match="square patch grid"):
        model._pos_embed(torch.randn(1, 15, 32))


def test_timm_feature_getter_and_get_intermediate_layers():
    """``timm.create_model(..., features_only=True)``-style wrapping and the DINO-style API see res 1 features."""
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = manual_blocks(model, x, torch.ones(2), (1, 3))
        layers = model.get_intermediate_layers(x, n=[1, 3], reshape=False)
        getter = FeatureGetterNet(model, out_indices=(1, 3), output_fmt="NCHW")
        feats = getter(x)
    for t, i in zip(layers, (1, 3)):
        torch.testing.assert_close(t, ref[i], rtol=0, atol=1e-6)
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
    for f, i in zip(feats, (1, 3)):
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), ref[i], rtol=0, atol=1e-6)
    assert [info["num_chs"] for info in getter.feature_info.get_dicts()] == [32, 32]
