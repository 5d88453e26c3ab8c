"""Tests for util/lr_decay.py: weight-decay split and layer-wise lr decay groups."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from util.lr_decay import apply_linear_layer_scale, get_layer_id_for_vit, param_groups_lrd, param_groups_weight_decay


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-D
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2)


def _names(model: nn.Module, group: dict) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in group["params"]]


def test_weight_decay_groups_membership_and_order():
    m = Tiny()
    groups = param_groups_weight_decay(m, 0.05)
    assert len(groups) == 2
    assert _names(m, groups[0]) == ["cls_token", "proj.weight", "head.weight"]
    assert _names(m, groups[1]) == ["scale", "proj.bias", "norm.weight", "norm.bias", "head.bias"]
    assert groups[0]["param_names"] == _names(m, groups[0])
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.05, 0.0)
    assert groups[0]["lr_scale"] == groups[1]["lr_scale"] == 1.0
    torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))  # accepted by the optimizer


def test_weight_decay_no_decay_list():
    m = Tiny()
    groups = param_groups_weight_decay(m, 0.05, no_weight_decay_list=("cls_token",))
    assert _names(m, groups[0]) == ["proj.weight", "head.weight"]
    assert _names(m, groups[1])[0] == "cls_token"


def _vit() -> VisionTransformer:
    m = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    m.pos_embed.requires_grad_(False)  # frozen, as in the finetune script
    return m


def test_layer_ids():
    assert get_layer_id_for_vit("cls_token", 24) == 0
    assert get_layer_id_for_vit("patch_embed.proj.weight", 24) == 0
    assert get_layer_id_for_vit("blocks.0.attn.qkv.weight", 24) == 1
    assert get_layer_id_for_vit("blocks.23.mlp.fc2.bias", 24) == 24
    assert get_layer_id_for_vit("norm.weight", 24) == 25
    assert get_layer_id_for_vit("head.1.weight", 24) == 25


def test_layer_decay_scales_on_tiny_vit():
    m = _vit()
    groups = param_groups_lrd(m, weight_decay=0.05, layer_decay=0.75)
    assert [g["name"] for g in groups] == [
        "layer_0_no_decay", "layer_0_decay",
        "layer_1_no_decay", "layer_1_decay", "layer_2_no_decay", "layer_2_decay", "layer_3_no_decay", "layer_3_decay",
        "layer_4_no_decay", "layer_4_decay"]
    scale, wd = {}, {}
    for g in groups:
        assert g["param_names"] == _names(m, g)
        for n in g["param_names"]:
            scale[n], wd[n] = g["lr_scale"], g["weight_decay"]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(scale) == sorted(trainable) and "pos_embed" not in scale
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert scale["cls_token"] == pytest.approx(0.75 ** 4)
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** 4)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.75 ** 3)
    assert scale["blocks.1.norm1.bias"] == pytest.approx(0.75 ** 2)
    assert scale["blocks.2.mlp.fc2.weight"] == pytest.approx(0.75 ** 1)
    assert scale["norm.weight"] == scale["head.weight"] == scale["head.bias"] == 1.0
    assert wd["cls_token"] == 0.0 and wd["patch_embed.proj.weight"] == 0.05
    assert wd["blocks.0.attn.qkv.bias"] == 0.0 and wd["blocks.0.attn.qkv.weight"] == 0.05
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0 and wd["norm.weight"] == 0.0
    torch.optim.AdamW(groups, lr=1e-3)


def test_layer_decay_explicit_num_layers_and_missing_blocks():
    groups = param_groups_lrd(_vit(), layer_decay=0.5, num_layers=10)
    by_name = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert by_name["cls_token"] == pytest.approx(0.5 ** 11)
    assert by_name["head.weight"] == 1.0
    with pytest.raises(ValueError, match="num_layers"):
        param_groups_lrd(nn.Linear(2, 2))


def test_linear_layer_scale_hits_head_weight_group_only():
    m = _vit()
    groups = apply_linear_layer_scale(param_groups_lrd(m), 10.0)
    by_name = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert by_name["head.weight"] == pytest.approx(10.0)
    assert by_name["head.bias"] == 1.0 and by_name["norm.weight"] == 1.0  # shares a group with norm (original)
    assert by_name["blocks.2.attn.qkv.weight"] == pytest.approx(0.75)
    # linear-probe style head Sequential(BN, Linear): same rule by name
    m.head = nn.Sequential(nn.BatchNorm1d(32, affine=False), nn.Linear(32, 5))
    groups = apply_linear_layer_scale(param_groups_lrd(m), 3.0)
    by_name = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert by_name["head.1.weight"] == pytest.approx(3.0) and by_name["head.1.bias"] == 1.0
    with pytest.raises(ValueError, match="classifier"):
        apply_linear_layer_scale(param_groups_lrd(m), 2.0, head_prefix="classifier.")
    assert apply_linear_layer_scale(param_groups_lrd(m), 1.0, head_prefix="classifier.")  # no-op
