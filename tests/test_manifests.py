"""State-dict layout of the released architectures, checked on the meta device (no 1.3 GB allocation)."""
from __future__ import annotations

import json

import pytest
import torch

import models_mae
import models_vit
from conftest import DATA_DIR


def manifest(name: str) -> dict:
    return json.loads((DATA_DIR / f"{name}.json").read_text())


def meta_state_dict(entries) -> dict:
    return {key: torch.empty(shape, device="meta") for key, shape, _ in entries}


@pytest.mark.parametrize("name", ["mae_vit_large_patch16", "mae_vit_base_patch16"])
def test_mae_manifest_strict_load(name):
    spec = manifest(name)
    with torch.device("meta"):
        model = models_mae.MODELS[name]()
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == [[k, s] for k, s, _ in spec["keys"]]
    assert len(state) == spec["num_keys"]
    assert sum(v.numel() for v in state.values()) == spec["num_params"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == spec["num_trainable_params"]
    model.load_state_dict(meta_state_dict(spec["keys"]), strict=True)


def test_released_architecture_size():
    spec = manifest("mae_vit_large_patch16")
    assert spec["num_keys"] == 393 and spec["num_params"] == 322_930_438
    with torch.device("meta"):
        model = models_mae.mae_vit_large_patch16()
    assert sum(p.numel() for p in model.state_dict().values()) == 322_930_438


def test_aliases_build_the_same_architecture():
    with torch.device("meta"):
        a = models_mae.mae_vit_base_patch16_dec512d8b()
        b = models_mae.mae_vit_base_patch16()
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_vit_large_manifest_strict_load():
    spec = manifest("vit_large_patch16")
    with torch.device("meta"):
        model = models_vit.vit_large_patch16(num_classes=1000)
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == [[k, s] for k, s, _ in spec["keys"]]
    assert sum(v.numel() for v in state.values()) == spec["num_params"]
    model.load_state_dict(meta_state_dict(spec["keys"]), strict=True)


def test_vit_large_global_pool_variant():
    spec = manifest("vit_large_patch16")
    with torch.device("meta"):
        model = models_vit.vit_large_patch16(num_classes=1000, global_pool=True)
    expected = [k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k for k, _, _ in spec["keys"]]
    keys = list(model.state_dict())
    assert sorted(keys) == sorted(expected)
    assert len(keys) == spec["global_pool_variant"]["num_keys"]


def test_vit_large_linprobe_head_keys():
    spec = manifest("vit_large_patch16")
    with torch.device("meta"):
        model = models_vit.vit_large_patch16(num_classes=1000)
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(1024, affine=False, eps=1e-6), model.head)
    state = model.state_dict()
    head = [[k, list(v.shape)] for k, v in state.items() if k.startswith("head.")]
    assert head == [[k, s] for k, s, _ in spec["linprobe_head_keys"]]
    assert len(state) == spec["linprobe_num_keys"]
