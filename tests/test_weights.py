"""Weights -> encoder (util/weights.py): the patch size is read from the model or the weights (never from a model's
name), one shape table serves the MAE and the encoder, and the launchers use it."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

import main_linprobe
import main_pretrain
import models_mae
import models_vit
import harness
from harness.pretrained import architecture_of
from util.weights import KNOWN_ARCHS, count_blocks, encoder_name, factory_patch_size, patch_size_of

DEMO = str(Path(__file__).resolve().parent.parent / "config" / "demo.yaml")
ODD_VIT = partial(models_vit.VisionTransformer, patch_size=8, embed_dim=32, depth=1, num_heads=2)
ODD_MAE = partial(models_mae.MaskedAutoencoderViT, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, fcn_dim=16, fcn_layers=1)


def test_patch_size_is_read_from_model_and_weights():
    model = ODD_VIT(img_size=32)
    assert patch_size_of(model) == 8 and patch_size_of(model.state_dict()) == 8
    assert factory_patch_size(ODD_VIT) == 8 and factory_patch_size(ODD_MAE) == 8
    for name, factory in {**models_mae.MODELS, **models_vit.MODELS}.items():
        with torch.device("meta"):
            assert factory_patch_size(factory) == factory().patch_embed.proj.kernel_size[0], name
    with pytest.raises(ValueError, match="patch_embed"):
        patch_size_of({"blocks.0.norm1.weight": torch.zeros(3)})


def test_one_shape_table_for_the_mae_and_the_encoder():
    state = models_mae.mae_vit_tiny_patch16().state_dict()
    name, _ = models_mae.infer_architecture(state)
    assert name == "mae_" + architecture_of(state, {}, "test") == "mae_vit_tiny_patch16"
    assert count_blocks(state) == 4 and count_blocks(state, "decoder_blocks.") == 2
    for (patch, width, depth), (_, vit_name, _) in KNOWN_ARCHS.items():
        assert encoder_name(patch, width, depth) == vit_name
        if vit_name is not None:  # every encoder of the table has its MAE and its models_vit factory
            assert vit_name in models_vit.MODELS and f"mae_{vit_name}" in models_mae.MODELS


def test_launchers_check_the_input_size_against_the_models_patch(tmp_path, monkeypatch):
    """A factory whose name says patch16 but builds patch 8: the launchers use 8."""
    monkeypatch.setitem(models_mae.MODELS, "mae_vit_odd_patch16", ODD_MAE)
    monkeypatch.setitem(models_vit.MODELS, "vit_odd_patch16", ODD_VIT)
    pre = main_pretrain.get_args_parser().parse_args(
        ["--config", DEMO, "--model", "mae_vit_odd_patch16", "--input_size", "36", "--device", "cpu",
         "--output_dir", str(tmp_path / "pre"), "--skip_knn_eval", "--epochs", "1"])
    with pytest.raises(harness.UserError, match="--input_size 36: must be a multiple of the patch size 8"):
        main_pretrain.main(pre)
    probe = main_linprobe.get_args_parser().parse_args(
        ["--config", DEMO, "--eval_dataset", "demo", "--model", "vit_odd_patch16", "--input_size", "36",
         "--device", "cpu", "--allow_random_init", "--output_dir", str(tmp_path / "probe"), "--epochs", "1"])
    with pytest.raises(harness.UserError, match="--input_size 36: must be a multiple of the patch size 8"):
        main_linprobe.main(probe)
