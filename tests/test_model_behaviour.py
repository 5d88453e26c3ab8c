"""Behaviour of the Scale-MAE pretraining model on tiny configurations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models_mae


def batch(n=3, side=64, chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, chans, side, side, generator=g)
    targets = torch.randn(n, chans, 2 * side // 16 * 16, 2 * side // 16 * 16, generator=g)
    noise = torch.rand(n, (side // 16) ** 2, generator=g)
    return imgs, targets, noise


def test_defaults_are_the_cli_defaults():
    model = models_mae.MaskedAutoencoderViT(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                                            decoder_num_heads=2, fcn_dim=16)
    assert len(model.decoder_blocks) == 3
    assert len(model.fcn_high.conv_blocks) == 2
    assert model.band_config == (7, 56)
    assert not model.use_l1_loss and not model.absolute_scale and model.independent_fcn_head


def test_initialisation_follows_the_original(tiny_mae):
    model = tiny_mae()
    assert torch.count_nonzero(model.decoder_pos_embed) == 0
    assert torch.count_nonzero(model.mask_token_decoder) == 0
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    from util.pos_embed import sincos_pos_embed_table
    torch.testing.assert_close(model.pos_embed, sincos_pos_embed_table(32, 4))
    assert 0.005 < model.cls_token.std().item() < 0.05
    assert torch.count_nonzero(model.decoder_embed.bias) == 0
    assert torch.equal(model.norm.weight, torch.ones(32))


@pytest.mark.parametrize("side", [56, 64, 96, 224])
def test_input_sizes(tiny_mae, side):
    model = tiny_mae()
    grid = side // 16
    imgs = torch.randn(2, 3, side, side)
    targets = torch.randn(2, 3, 32 * grid, 32 * grid)
    loss, (high, low, full), mask, *_ = model(imgs, targets, input_res=torch.tensor([1.0, 2.0]))
    assert torch.isfinite(loss)
    assert mask.shape == (2, grid * grid)
    assert int(mask.sum(1)[0]) == grid * grid - int(grid * grid * 0.25)
    assert high.shape == (2, (2 * grid) ** 2, 768) and full.shape == high.shape
    assert low.shape == (2, grid * grid, 768)


def test_backward_reaches_every_used_parameter(tiny_mae):
    model = tiny_mae()
    imgs, targets, noise = batch()
    model(imgs, targets, noise=noise)[0].backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == {"mask_token_decoder"}  # stored for checkpoint compatibility, unused as in the original
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_multispectral_in_chans(tiny_mae):
    model = tiny_mae(in_chans=6)
    imgs, targets, noise = batch(chans=6)
    loss, (high, low, full), *_ = model(imgs, targets, noise=noise)
    loss.backward()
    assert high.shape[-1] == 16 * 16 * 6 and low.shape[-1] == 16 * 16 * 6
    assert model.fcn_high.pred[-1].out_channels == 6
    assert model.patch_embed.proj.weight.grad.shape[1] == 6
    with pytest.raises(ValueError, match=r"\[N, 6, 128, 128\]"):
        model(imgs, targets[:, :3], noise=noise)


def test_changing_one_res_changes_only_that_sample(tiny_mae):
    model = tiny_mae().eval()
    imgs, targets, noise = batch(n=3)
    res = torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        _, before, *_ = model(imgs, targets, input_res=res, noise=noise)
        _, after, *_ = model(imgs, targets, input_res=torch.tensor([1.0, 2.5, 3.0]), noise=noise)
        feats_a = model(imgs, input_res=res, knn_feats=True)
        feats_b = model(imgs, input_res=torch.tensor([1.0, 2.5, 3.0]), knn_feats=True)
    for a, b in zip(before, after):
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[2], b[2], atol=1e-6)
        assert not torch.allclose(a[1], b[1], atol=1e-4)
    assert torch.allclose(feats_a[[0, 2]], feats_b[[0, 2]], atol=1e-5)
    assert not torch.allclose(feats_a[1], feats_b[1], atol=1e-4)


def test_res_none_equals_ones(tiny_mae):
    model = tiny_mae()
    imgs, targets, noise = batch()
    out_none = model(imgs, targets, noise=noise)
    out_ones = model(imgs, targets, input_res=torch.ones(3), target_res=torch.ones(3), noise=noise)
    assert torch.equal(out_none[0], out_ones[0])
    assert all(torch.equal(a, b) for a, b in zip(out_none[1], out_ones[1]))
    scalar = model(imgs, targets, input_res=1.0, noise=noise)
    assert torch.equal(out_none[0], scalar[0])


def test_absolute_scale_ignores_res(tiny_mae):
    model = tiny_mae(absolute_scale=True)
    imgs, targets, noise = batch()
    a = model(imgs, targets, input_res=torch.tensor([0.5, 2.0, 4.0]), noise=noise)[0]
    b = model(imgs, targets, noise=noise)[0]
    assert torch.equal(a, b)
    relative = tiny_mae()
    assert not torch.equal(relative(imgs, targets, input_res=torch.tensor([0.5, 2.0, 4.0]), noise=noise)[0],
                           relative(imgs, targets, noise=noise)[0])


def test_noise_decides_the_mask(tiny_mae):
    model = tiny_mae()
    imgs, targets, noise = batch()
    mask = model(imgs, targets, noise=noise)[2]
    kept = noise.argsort(1)[:, :4]
    expected = torch.ones_like(mask).scatter_(1, kept, 0.0)
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="noise"):
        model(imgs, targets, noise=noise[:, :5])


def test_knn_features_shape(tiny_mae):
    model = tiny_mae()
    imgs, _, _ = batch()
    with torch.no_grad():
        feats = model(imgs, input_res=torch.ones(3), knn_feats=True)
        small = model(imgs[:, :, :56, :56], knn_feats=True)
    assert feats.shape == (3, 32) and small.shape == (3, 32)


def test_loss_is_masked_band_error(tiny_mae):
    """The loss equals the masked per-pixel band errors computed by hand."""
    model = tiny_mae(band_config=(4, 56))
    imgs, targets, noise = batch()
    loss, _, mask, *_ = model(imgs, targets, noise=noise)
    latent, mask2, ids, pe = model.forward_encoder(imgs, 0.75, torch.ones(3), noise)
    high, low = model.forward_decoder(latent, ids, pe)
    blur = F.interpolate(F.interpolate(targets, size=4, mode="area"), size=128, mode="bilinear", align_corners=False)
    m_high = mask.reshape(3, 1, 4, 4).repeat_interleave(32, 2).repeat_interleave(32, 3)
    m_low = mask.reshape(3, 1, 4, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    expected = ((targets - blur - high) ** 2 * m_high).sum() / m_high.sum() + (
        (F.avg_pool2d(targets, 2) - low) ** 2 * m_low
    ).sum() / m_low.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_l1_loss_weight_scales_the_high_band_only(tiny_mae):
    imgs, targets, noise = batch()
    losses = [tiny_mae(use_l1_loss=True, l1_loss_weight=w)(imgs, targets, noise=noise)[0] for w in (0.0, 1.0, 2.0)]
    l2 = tiny_mae()(imgs, targets, noise=noise)[0]
    assert losses[1] - losses[0] > 0
    torch.testing.assert_close(losses[2] - losses[0], 2 * (losses[1] - losses[0]), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(losses[1], l2)


def test_band_config_224_uses_two_step_low_target(tiny_mae):
    targets = torch.randn(2, 3, 128, 128)
    direct = tiny_mae(band_config=(7, 56)).band_targets(targets, 64)[1]
    two_step = tiny_mae(band_config=(7, 224)).band_targets(targets, 32)[1]
    torch.testing.assert_close(direct, F.avg_pool2d(targets, 2))
    via224 = F.interpolate(F.interpolate(targets, size=224, mode="area"), size=32, mode="area")
    torch.testing.assert_close(two_step, via224)
    assert not torch.allclose(via224, F.adaptive_avg_pool2d(targets, 32))


def test_source_size_uses_the_real_targets(tiny_mae):
    model = tiny_mae()
    imgs, targets, _ = batch(side=64)
    noise = torch.rand(3, 4)
    a = model(imgs, targets, input_res=torch.ones(3), source_size=32, noise=noise)
    b = model(imgs, targets.flip(-1), input_res=torch.ones(3), source_size=[32], noise=noise)
    assert a[1][0].shape == (3, 16, 768)  # 32 px input -> 64 px high band = 4x4 patches of 16
    assert not torch.isclose(a[0], b[0])  # the loss sees the targets, not a copy of the input
    torch.testing.assert_close(a[5][:, 1:], model.forward_encoder(
        F.interpolate(imgs, size=32, mode="area"), 0.75, torch.full((3,), 2.0), noise)[3][:, 1:])
    with pytest.raises(ValueError, match="source_size"):
        model(imgs, targets, source_size=40)


def test_shared_head_and_progressive_keys(tiny_mae):
    shared = tiny_mae(independent_fcn_head=False)
    keys = list(shared.state_dict())
    assert any(k.startswith("fcn.") for k in keys) and not any(k.startswith("fcn_high.") for k in keys)
    progressive = tiny_mae(progressive=True)
    fpn = [k for k in progressive.state_dict() if k.startswith("fpn.")]
    assert fpn == ["fpn.fpn1.0.ln.weight", "fpn.fpn1.0.ln.bias", "fpn.fpn1.2.weight", "fpn.fpn1.2.bias",
                   "fpn.fpn2.0.weight", "fpn.fpn2.0.bias"]
    for model in (shared, progressive):
        imgs, targets, noise = batch()
        loss = model(imgs, targets, noise=noise)[0]
        loss.backward()
        assert torch.isfinite(loss)


def test_broken_original_options_raise_clearly():
    with pytest.raises(ValueError, match="use_mask_token"):
        models_mae.MaskedAutoencoderViT(use_mask_token=False)
    with pytest.raises(ValueError, match="project_pos_emb"):
        models_mae.MaskedAutoencoderViT(project_pos_emb=True)


def test_wrong_target_size_is_explained(tiny_mae):
    model = tiny_mae()
    imgs, targets, noise = batch()
    with pytest.raises(ValueError, match="targets must be"):
        model(imgs, targets[..., :64, :64], noise=noise)
    with pytest.raises(ValueError, match="targets"):
        model(imgs)


def test_patchify_roundtrip(tiny_mae):
    model = tiny_mae(in_chans=4)
    x = torch.randn(2, 4, 64, 64)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_mae):
    imgs, targets, noise = batch()
    plain, ckpt = tiny_mae(), tiny_mae()
    ckpt.set_grad_checkpointing(True)
    plain(imgs, targets, noise=noise)[0].backward()
    ckpt(imgs, targets, noise=noise)[0].backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_factories():
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_tiny_patch16"):
        with torch.device("meta"):
            model = models_mae.MODELS[name]()
        assert isinstance(model, models_mae.MaskedAutoencoderViT)
    tiny = models_mae.mae_vit_tiny_patch16()
    imgs, targets, noise = batch()
    assert torch.isfinite(tiny(imgs, targets, noise=noise)[0])


def test_patch14_predictions_are_patchified_per_token():
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(**{**__import__("conftest").TINY_MAE, "patch_size": 14})
    imgs, targets = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 128, 128)  # grid 4: 128 px is not a multiple of 14
    loss, (high, low, full), *_ = model(imgs, targets)
    assert high.shape == (2, 16, 32 * 32 * 3) and low.shape == (2, 16, 16 * 16 * 3)
    assert torch.isfinite(loss)


def test_one_res_for_the_batch_equals_a_constant_vector(tiny_mae):
    model = tiny_mae()
    imgs, targets, noise = batch()
    shared = model(imgs, targets, input_res=2.0, target_res=1.0, noise=noise)
    vector = model(imgs, targets, input_res=torch.full((3,), 2.0), target_res=torch.ones(3), noise=noise)
    assert torch.equal(shared[0], vector[0])
    assert shared[5].shape == vector[5].shape == (3, 17, 16)
    assert shared[6].shape == vector[6].shape == (3, 65, 16)
    with pytest.raises(ValueError, match="one value per sample"):
        model(imgs, targets, input_res=torch.ones(2), noise=noise)


def test_loss_only_returns_the_same_loss(tiny_mae):
    model = tiny_mae()
    imgs, targets, noise = batch()
    full = model(imgs, targets, noise=noise)
    loss = model(imgs, targets, noise=noise, loss_only=True)
    assert loss.dim() == 0 and torch.equal(loss, full[0])
