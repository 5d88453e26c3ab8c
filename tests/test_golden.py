"""The model computes what the original computes: golden fixtures recorded from the original code.

Every ``tests/data/golden_*.pt`` file is checked (build from its kwargs, strict load, run with its noise and
inputs in float32) with SPEC §4's tolerances.
"""
from __future__ import annotations

import pytest
import torch

import models_mae
from conftest import DATA_DIR, norm_layer_from_string

FIXTURES = sorted(DATA_DIR.glob("golden_*.pt"))


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """|a - e| <= 1e-5 + 1e-5 * max|e| (SPEC §4: absolute plus 1e-5 of the largest magnitude)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    tol = 1e-5 + 1e-5 * expected.abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


@pytest.fixture(params=FIXTURES, ids=[f.stem for f in FIXTURES])
def golden(request):
    record = torch.load(request.param, weights_only=True)
    kwargs = dict(record["kwargs"])
    kwargs["norm_layer"] = norm_layer_from_string(kwargs.get("norm_layer", "LayerNorm(eps=1e-6)"))
    model = models_mae.MaskedAutoencoderViT(**kwargs)
    model.load_state_dict(record["state_dict"], strict=True)
    model.train()
    return model, record


def test_fixtures_are_present():
    assert FIXTURES, "tests/data/golden_tiny.pt is missing"


def test_state_dict_keys_in_original_order(golden):
    model, record = golden
    assert list(model.state_dict()) == list(record["state_dict"])


def test_forward_matches_original(golden):
    model, record = golden
    inp, out = record["inputs"], record["outputs"]
    loss, preds, mask, *rest = model(
        inp["imgs"], inp["targets"], mask_ratio=inp["mask_ratio"], input_res=inp["input_res"],
        target_res=inp["target_res"], noise=inp["noise"],
    )
    expected_loss = out["loss"].item()
    assert abs(loss.item() - expected_loss) <= 1e-5 * abs(expected_loss)
    assert torch.equal(mask, out["mask"])
    assert len(preds) == 3
    for name, actual, expected in zip(("pred_high", "pred_low", "pred_all"), preds, out["pred"]):
        close(actual, expected, name)
    pos_embed_encoder, pos_embed_decoder = rest[2], rest[3]
    close(pos_embed_encoder, out["pos_embed_encoder"], "pos_embed_encoder")
    close(pos_embed_decoder, out["pos_embed_decoder"], "pos_embed_decoder")
    assert rest[4] is inp["imgs"]


def test_encoder_matches_original(golden):
    model, record = golden
    inp, out = record["inputs"], record["outputs"]
    with torch.no_grad():
        latent, mask, ids_restore, _ = model.forward_encoder(
            inp["imgs"], inp["mask_ratio"], inp["input_res"], noise=inp["noise"]
        )
    close(latent, out["latent"], "latent")
    assert torch.equal(ids_restore, out["ids_restore"])
    assert torch.equal(mask, out["mask"])


def test_gradients_match_original(golden):
    model, record = golden
    inp = record["inputs"]
    loss = model(
        inp["imgs"], inp["targets"], mask_ratio=inp["mask_ratio"], input_res=inp["input_res"],
        target_res=inp["target_res"], noise=inp["noise"],
    )[0]
    loss.backward()
    params = dict(model.named_parameters())
    assert record["grads"], "fixture has no gradients"
    for name, expected in record["grads"].items():
        grad = params[name].grad
        assert grad is not None, f"{name} got no gradient"
        err = (grad - expected).abs().max().item()
        tol = 1e-4 * expected.abs().max().item()
        assert err <= tol, f"grad {name}: max abs error {err:.3g} > {tol:.3g}"


def test_knn_features_match_original(golden):
    model, record = golden
    inp, out = record["inputs"], record["outputs"]
    with torch.no_grad():
        feats = model(inp["imgs"], input_res=inp["input_res"], knn_feats=True, noise=inp["knn_noise"])
        close(feats, out["knn_feats"], "knn_feats")
        if "knn_imgs_resized" in inp:
            feats = model(
                inp["knn_imgs_resized"], input_res=inp["knn_input_res_resized"], knn_feats=True,
                noise=inp["knn_noise_resized"],
            )
            close(feats, out["knn_feats_resized"], "knn_feats_resized")
