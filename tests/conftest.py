"""Shared test fixtures: paths to the data copied into ``tests/data`` and tiny model builders."""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

DATA_DIR = Path(__file__).parent / "data"

# Tiny MAE used by behaviour tests: p16, 32-d encoder, 16-d decoder, 16-d heads.
TINY_MAE = dict(
    embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    fcn_dim=16, fcn_layers=1, img_size=64,
)


def norm_layer_from_string(spec):
    """Fixture files store ``norm_layer`` as the string ``"LayerNorm(eps=1e-6)"``."""
    if not isinstance(spec, str):
        return spec
    match = re.fullmatch(r"LayerNorm\(eps=([0-9.e+-]+)\)", spec)
    if not match:
        raise ValueError(f"unknown norm_layer spec {spec!r}")
    return partial(nn.LayerNorm, eps=float(match.group(1)))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture
def tiny_mae():
    import models_mae

    def build(**overrides):
        torch.manual_seed(0)
        return models_mae.MaskedAutoencoderViT(**{**TINY_MAE, **overrides})

    return build
