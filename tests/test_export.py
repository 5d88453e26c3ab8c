"""tools/export_encoder.py: timm-keyed encoder export (.pth/.safetensors/.json) and the reverse import."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import models_mae
import models_vit
from conftest import DATA_DIR

_PATH = Path(__file__).resolve().parent.parent / "tools" / "export_encoder.py"
_spec = importlib.util.spec_from_file_location("export_encoder", _PATH)
ee = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("export_encoder", ee)
_spec.loader.exec_module(ee)

TINY = dict(embed_dim=192, depth=4, num_heads=3, patch_size=16)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=64).eval()
    path = tmp_path_factory.mktemp("export") / "mae_tiny.pth"
    torch.save({"model": mae.state_dict(), "epoch": 7}, path)
    return path, mae


@pytest.fixture(scope="module")
def exported(mae_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_out") / "tiny_encoder"
    result = ee.main([str(mae_ckpt[0]), "--output", str(out)])
    return out, result


def timm_tiny(num_classes=0, img_size=64, **kw):
    return TimmViT(img_size=img_size, num_classes=num_classes, **TINY, **kw).eval()


def test_timm_loads_with_only_head_missing(exported, mae_ckpt):
    out, result = exported
    assert {k: p.name for k, p in result["paths"].items()} == {
        "pth": "tiny_encoder.pth", "safetensors": "tiny_encoder.safetensors", "json": "tiny_encoder.json"}
    sd = torch.load(out.with_suffix(".pth"), map_location="cpu", weights_only=True)
    assert list(sd) == list(timm_tiny().state_dict())  # exactly timm's keys (no head), in timm's order
    with_head = timm_tiny(num_classes=10)
    res = with_head.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["head.bias", "head.weight"] and res.unexpected_keys == []
    timm_model = timm_tiny()
    timm_model.load_state_dict(sd, strict=True)

    mae = mae_ckpt[1]
    vit = models_vit.vit_tiny_patch16(img_size=64, num_classes=0)
    models_vit.load_mae_checkpoint(vit, torch.load(mae_ckpt[0], weights_only=True))
    vit.eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = vit(x, input_res=torch.ones(3))
        theirs = timm_model(x)
        knn = mae(x, input_res=torch.ones(3), knn_feats=True)
    assert (ours - theirs).abs().max() < 1e-5
    assert (knn - theirs).abs().max() < 1e-5
    # the stored pos_embed is the res=1 sin-cos table with a zero cls slot (not the checkpoint's unused tensor)
    assert torch.equal(sd["pos_embed"][0, 0], torch.zeros(192))


def test_safetensors_round_trip_and_metadata(exported):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, _ = exported
    pth = torch.load(out.with_suffix(".pth"), map_location="cpu", weights_only=True)
    st = load_file(str(out.with_suffix(".safetensors")))
    assert list(st) and set(st) == set(pth) and all(torch.equal(st[k], pth[k]) for k in pth)
    with safe_open(str(out.with_suffix(".safetensors")), framework="pt") as f:
        meta = f.metadata()
    assert meta["license"] == "CC-BY-NC-4.0"
    assert json.loads(meta["pos_embed_res"]) == 1.0
    assert json.loads(meta["input_normalization"])["mean"] == [0.485, 0.456, 0.406]
    assert json.loads(meta["architecture"])["num_heads"] == 3
    assert "input_res" in meta["res_semantics"]
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["license"] == "CC-BY-NC-4.0" and sidecar["source_epoch"] == 7
    assert sidecar["keys"] == len(pth) and sidecar["models_vit_model"] == "vit_tiny_patch16"
    state, meta2 = ee.load_encoder_file(out.with_suffix(".safetensors"))
    assert meta2["architecture"]["embed_dim"] == 192 and set(state) == set(pth)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_reverse_import_into_models_vit(exported, mae_ckpt, suffix):
    out, _ = exported
    imported = ee.import_encoder(out.with_suffix(suffix), num_classes=5).eval()
    direct = models_vit.vit_tiny_patch16(img_size=64, num_classes=5)
    models_vit.load_mae_checkpoint(direct, torch.load(mae_ckpt[0], weights_only=True))
    direct.head.load_state_dict(imported.head.state_dict())
    direct.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    res = torch.tensor([0.5, 2.5])  # the GSD embedding still follows input_res after the round trip
    with torch.no_grad():
        assert torch.equal(imported(x, input_res=res), direct(x, input_res=res))
    # an encoder-only dict also goes straight through load_mae_checkpoint: only the head is missing
    report = models_vit.load_mae_checkpoint(models_vit.vit_tiny_patch16(img_size=64, num_classes=5),
                                            ee.load_encoder_file(out.with_suffix(suffix))[0])
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"] and report.unexpected_keys == []
    # and the launcher accepts the exported file as --checkpoint_path
    import main_linprobe

    model = models_vit.vit_tiny_patch16(img_size=64, num_classes=3)
    report = main_linprobe.load_pretrained(model, str(out.with_suffix(suffix)))
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"]


def test_timm_builder(exported):
    out, _ = exported
    model = ee.build_timm_encoder(out.with_suffix(".safetensors"), num_classes=4)
    assert model.head.out_features == 4 and model.embed_dim == 192 and len(model.blocks) == 4


def test_vit_large_release_keys_match_timm():
    """The released 393-key layout (shapes from the manifest, meta tensors) -> exactly timm's vit_large_patch16_224."""
    import timm

    manifest = json.loads((DATA_DIR / "mae_vit_large_patch16.json").read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape, _ in manifest["keys"]}
    state, arch = ee.to_timm_state_dict({"model": sd})
    assert arch.timm_name == "vit_large_patch16_224" and arch.models_vit_name == "vit_large_patch16"
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.img_size) == (1024, 24, 16, 224)
    with torch.device("meta"):
        ref = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert list(state) == list(ref.state_dict())


def test_res_and_img_size_options(mae_ckpt, tmp_path):
    path, mae = mae_ckpt
    out = ee.export_encoder(path, tmp_path / "enc128", img_size=128, res=2.0, formats=("pth",))
    assert set(out["paths"]) == {"pth", "json"}
    sd = torch.load(out["paths"]["pth"], weights_only=True)
    assert sd["pos_embed"].shape == (1, 65, 192)
    timm_model = timm_tiny(img_size=128)
    timm_model.load_state_dict(sd)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = mae(x, input_res=torch.full((2,), 2.0), knn_feats=True)
        assert (timm_model(x) - ref).abs().max() < 1e-5


def test_global_pool_encoder(tmp_path):
    torch.manual_seed(0)
    vit = models_vit.vit_tiny_patch16(img_size=64, num_classes=3, global_pool=True).eval()
    out = ee.export_encoder({"model": vit.state_dict()}, tmp_path / "gp")
    sd = torch.load(out["paths"]["pth"], weights_only=True)
    assert "fc_norm.weight" in sd and "norm.weight" not in sd and not any(k.startswith("head") for k in sd)
    timm_model = timm_tiny(global_pool="avg")
    timm_model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (timm_model(x) - vit.forward_head(vit.forward_features(x), pre_logits=True)).abs().max() < 1e-5


def test_linprobe_checkpoint_exports_without_head(tmp_path):
    torch.manual_seed(0)
    vit = models_vit.vit_tiny_patch16(img_size=64, num_classes=3)
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    sd.update({"head.0.running_mean": torch.zeros(192), "head.1.weight": torch.zeros(3, 192)})
    state, _ = ee.to_timm_state_dict({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3})
    assert not any(k.startswith("head") for k in state) and torch.equal(state["cls_token"], sd["cls_token"])


def test_unknown_or_incomplete_shapes_error():
    torch.manual_seed(0)
    odd = models_vit.VisionTransformer(embed_dim=96, depth=3, num_heads=4, img_size=64, num_classes=0)
    with pytest.raises(ValueError, match=r"unknown encoder shape: patch 16, width 96, depth 3"):
        ee.to_timm_state_dict(odd.state_dict())
    state, arch = ee.to_timm_state_dict(odd.state_dict(), num_heads=4)  # explicit heads: custom export works
    assert arch.timm_name is None and arch.num_heads == 4
    timm_model = TimmViT(img_size=64, patch_size=16, embed_dim=96, depth=3, num_heads=4, num_classes=0)
    timm_model.load_state_dict(state, strict=True)

    tiny = models_vit.vit_tiny_patch16(img_size=64, num_classes=0).state_dict()
    del tiny["blocks.2.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks.2.mlp.fc1.bias'\]"):
        ee.to_timm_state_dict(tiny)
    with pytest.raises(ValueError, match="neither encoder nor decoder"):
        ee.to_timm_state_dict({**models_vit.vit_tiny_patch16(img_size=64).state_dict(), "foo.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        ee.to_timm_state_dict({"model": {"x": torch.ones(1)}})
