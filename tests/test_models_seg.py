"""Segmentation model: multi-level encoder features, neck strides, UPerNet shapes, released-weight loading."""
from __future__ import annotations

import json

import pytest
import torch

import models_mae
import models_seg
import models_vit
from conftest import DATA_DIR
from util.pos_embed import gsd_sincos_pos_embed


def tiny_seg(num_classes=2, aux=16, **kw):
    torch.manual_seed(0)
    backbone = models_vit.VisionTransformer(embed_dim=32, depth=4, num_heads=2, img_size=64, num_classes=0)
    return models_seg.SegmentationModel(backbone, num_classes, channels=16, aux_channels=aux, **kw)


def test_default_out_indices():
    assert models_seg.default_out_indices(24) == (7, 11, 15, 23)
    assert models_seg.default_out_indices(12) == (3, 5, 7, 11)
    assert models_seg.default_out_indices(4) == (0, 1, 2, 3)
    assert models_seg.default_out_indices(8) == (1, 3, 5, 7)
    with torch.device("meta"):
        model = models_seg.build_segmentation_model("vit_large_patch16", 2)
    assert model.out_indices == (7, 11, 15, 23)


def test_encoder_maps_equal_manual_forward_with_per_sample_res():
    model = tiny_seg(out_indices=(0, 2, 2, 3)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = torch.tensor([0.7, 2.0])
    bb = model.backbone
    with torch.no_grad():
        h = torch.cat([bb.cls_token.expand(2, -1, -1), bb.patch_embed(x)], 1) + gsd_sincos_pos_embed(32, 4, res)
        manual = []
        for blk in bb.blocks:
            h = blk(h)
            manual.append(h[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
        maps = model.encoder_maps(x, res)
    assert len(maps) == 4
    for got, i in zip(maps, (0, 2, 2, 3)):
        torch.testing.assert_close(got, manual[i], rtol=0, atol=1e-6)


def test_one_sample_res_changes_only_its_output():
    model = tiny_seg().eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(x, input_res=torch.tensor([1.0, 1.0, 1.0]))
        b = model(x, input_res=torch.tensor([1.0, 1.0, 4.0]))
    assert torch.equal(a[:2], b[:2])
    assert (a[2] - b[2]).abs().max() > 1e-4


def test_neck_strides_and_head_shapes():
    model = tiny_seg(num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.neck(model.encoder_maps(x))
        assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # 1/4 .. 1/32
        logits, aux = model(x, return_aux=True)
    assert logits.shape == aux.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("side", [224, 512])
def test_upernet_output_shapes_vit_tiny(side):
    torch.manual_seed(0)
    model = models_seg.build_segmentation_model("vit_tiny_patch16", 2, img_size=side, channels=16, aux_channels=8)
    model.eval()
    with torch.no_grad():
        logits, aux = model(torch.randn(1, 3, side, side), torch.tensor([1.5]), return_aux=True)
    assert logits.shape == aux.shape == (1, 2, side, side)
    assert torch.isfinite(logits).all()


def test_trainable_parameters_all_receive_gradients():
    """What DDP requires: every trainable tensor is used; unused encoder tensors are frozen."""
    model = tiny_seg(out_indices=(0, 1, 1, 2)).train()
    logits, aux = model(torch.randn(2, 3, 64, 64), return_aux=True)
    (logits.mean() + aux.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert "backbone.pos_embed" in frozen and "backbone.norm.weight" in frozen
    assert any(n.startswith("backbone.blocks.3.") for n in frozen)
    assert not any(n.startswith("backbone.blocks.2.") for n in frozen)


def _meta_state(name):
    manifest = json.loads((DATA_DIR / f"{name}.json").read_text())
    return {k: torch.empty(shape, device="meta") for k, shape, _ in manifest["keys"]}


@pytest.mark.parametrize("manifest", ["mae_vit_large_patch16", "vit_large_patch16"])
def test_released_vit_large_loads_with_only_head_keys_missing(manifest):
    with torch.device("meta"):
        model = models_seg.build_segmentation_model("vit_large_patch16", 2)
    report = models_seg.load_pretrained_encoder(model, {"model": _meta_state(manifest)})
    assert report.missing_keys, "the segmentation heads must be reported missing"
    assert all(k.startswith(models_seg.HEAD_PREFIXES) for k in report.missing_keys)
    assert set(report.missing_keys) == {k for k in model.state_dict() if k.startswith(models_seg.HEAD_PREFIXES)}
    assert all(k.startswith(models_vit.MAE_ONLY_PREFIXES) for k in report.unexpected_keys)
    if manifest == "mae_vit_large_patch16":
        assert "decoder_embed.weight" in report.unexpected_keys


def test_pretrained_values_land_in_the_backbone():
    torch.manual_seed(0)
    mae = models_mae.MaskedAutoencoderViT(embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                          decoder_num_heads=2, fcn_dim=16, fcn_layers=1, img_size=64)
    model = tiny_seg()
    report = models_seg.load_pretrained_encoder(model, {"model": mae.state_dict()})
    assert all(k.startswith(models_seg.HEAD_PREFIXES) for k in report.missing_keys)
    torch.testing.assert_close(model.backbone.blocks[3].mlp.fc2.weight, mae.blocks[3].mlp.fc2.weight)
    with pytest.raises(ValueError, match="--resume"):
        models_seg.load_pretrained_encoder(model, {"model": model.state_dict()})


def test_segment_resume_at_another_input_size():
    """A run trained at 64 px evaluates/resumes at 224 px: the stored pos_embed (never used in forward) differs in
    size and is not a mismatch; every other tensor is loaded exactly."""
    import main_segment

    small = models_seg.build_segmentation_model("vit_tiny_patch16", 2, img_size=64, channels=16, aux_channels=8)
    large = models_seg.build_segmentation_model("vit_tiny_patch16", 2, img_size=224, channels=16, aux_channels=8)
    main_segment.load_resumed(large, {"model": small.state_dict(), "best_miou": 0.5}, "ckpt.pth", [0, 1], "c.yaml")
    own, src = large.state_dict(), small.state_dict()
    assert own["backbone.pos_embed"].shape != src["backbone.pos_embed"].shape
    assert all(torch.equal(own[k], src[k]) for k in own if k != "backbone.pos_embed")
    other = models_seg.build_segmentation_model("vit_tiny_patch16", 2, img_size=64, channels=32, aux_channels=8)
    with pytest.raises(SystemExit, match="does not match the model"):
        main_segment.load_resumed(other, {"model": small.state_dict()}, "ckpt.pth", [0, 1], "c.yaml")
