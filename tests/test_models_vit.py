"""The timm-based encoder: GSD embedding hook, pooling modes, and loading pretraining checkpoints."""
from __future__ import annotations

import pytest
import torch

import models_mae
import models_vit
from conftest import TINY_MAE


def tiny_vit(**kwargs):
    torch.manual_seed(1)
    return models_vit.VisionTransformer(embed_dim=32, depth=2, num_heads=2, img_size=64, num_classes=5, **kwargs)


def tiny_mae_state():
    torch.manual_seed(0)
    return models_mae.MaskedAutoencoderViT(**TINY_MAE)


@pytest.mark.parametrize("side", [56, 64, 96])
def test_forward_any_square_size(side):
    model = tiny_vit().eval()
    logits = model(torch.randn(2, 3, side, side), input_res=torch.tensor([1.0, 2.0]))
    assert logits.shape == (2, 5)


def test_res_is_per_sample():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x, input_res=torch.tensor([1.0, 2.0]))
        b = model(x, input_res=torch.tensor([1.0, 3.0]))
        c = model(x)
        d = model(x, input_res=torch.ones(2))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert torch.equal(c, d)


def test_learned_pos_embed_is_not_used():
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.pos_embed.normal_()
        after = model(x)
    assert torch.equal(before, after)


def test_global_pool_uses_fc_norm():
    model = tiny_vit(global_pool=True)
    keys = list(model.state_dict())
    assert "fc_norm.weight" in keys and "norm.weight" not in keys
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_encoder_equals_mae_knn_features():
    mae = tiny_mae_state().eval()
    vit = tiny_vit().eval()
    report = models_vit.load_mae_checkpoint(vit, {"model": mae.state_dict()})
    assert set(report.missing_keys) == {"head.weight", "head.bias"}
    expected_unexpected = {k for k in mae.state_dict() if k.startswith(models_vit.MAE_ONLY_PREFIXES)}
    assert set(report.unexpected_keys) == expected_unexpected
    x, res = torch.randn(3, 3, 64, 64), torch.tensor([0.5, 1.0, 2.5])
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x, res)[:, 0], mae(x, input_res=res, knn_feats=True),
                                   atol=1e-5, rtol=1e-5)


def test_global_pool_load_reports_fc_norm_and_norm():
    vit = tiny_vit(global_pool=True)
    report = models_vit.load_mae_checkpoint(vit, tiny_mae_state().state_dict())
    assert set(report.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"norm.weight", "norm.bias"} <= set(report.unexpected_keys)


def test_load_from_file_and_ddp_prefix(tmp_path):
    mae = tiny_mae_state()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in mae.state_dict().items()}, "epoch": 3}, path)
    vit = tiny_vit()
    models_vit.load_mae_checkpoint(vit, path)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)


def test_other_input_size_drops_unused_pos_embed():
    vit = models_vit.VisionTransformer(embed_dim=32, depth=2, num_heads=2, img_size=96, num_classes=5)
    report = models_vit.load_mae_checkpoint(vit, tiny_mae_state().state_dict())
    assert "pos_embed" in report.missing_keys


def test_wrong_architecture_names_the_shapes():
    vit = models_vit.VisionTransformer(embed_dim=48, depth=2, num_heads=2, img_size=64, num_classes=5)
    with pytest.raises(ValueError, match=r"cls_token: checkpoint \(1, 1, 32\) vs model \(1, 1, 48\)"):
        models_vit.load_mae_checkpoint(vit, tiny_mae_state().state_dict())


def test_missing_encoder_keys_or_foreign_keys_are_refused():
    state = tiny_mae_state().state_dict()
    truncated = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"missing \['blocks.1"):
        models_vit.load_mae_checkpoint(tiny_vit(), truncated)
    foreign = dict(state, **{"backbone.layer1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="backbone.layer1.weight"):
        models_vit.load_mae_checkpoint(tiny_vit(), foreign)


def test_factories_on_meta():
    for name, width in (("vit_base_patch16", 768), ("vit_large_patch16", 1024), ("vit_huge_patch14", 1280)):
        with torch.device("meta"):
            model = models_vit.MODELS[name](num_classes=10)
        assert model.embed_dim == width and model.patch_embed.patch_size == (int(name[-2:]),) * 2
