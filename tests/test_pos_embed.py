"""GSD-scaled sin-cos positional embedding against a direct float64 evaluation of the formula."""
from __future__ import annotations

import math

import pytest
import torch

from util.pos_embed import gsd_sincos_pos_embed, sincos_pos_embed_table


def reference(embed_dim: int, grid: int, res: float) -> torch.Tensor:
    """Formula of original_behaviour.md §1.3, one token at a time: [G*G, E]."""
    quarter = embed_dim // 4
    rows = []
    for r in range(grid):
        for c in range(grid):
            x, y = c * res, r * res
            w = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
            rows.append(
                [math.sin(x * wk) for wk in w] + [math.cos(x * wk) for wk in w]
                + [math.sin(y * wk) for wk in w] + [math.cos(y * wk) for wk in w]
            )
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("embed_dim,grid", [(16, 3), (32, 4), (64, 14)])
def test_matches_formula_per_sample(embed_dim, grid):
    res = torch.tensor([0.5, 1.0, 2.5, 4.99])
    table = gsd_sincos_pos_embed(embed_dim, grid, res, cls_token=True)
    assert table.shape == (4, grid * grid + 1, embed_dim)
    assert table.dtype == torch.float32
    assert torch.count_nonzero(table[:, 0]) == 0  # cls slot carries no position
    for n, r in enumerate(res.tolist()):
        torch.testing.assert_close(table[n, 1:].double(), reference(embed_dim, grid, r), atol=1e-5, rtol=0)


def test_res_one_is_mae_table():
    table = sincos_pos_embed_table(32, 4)
    assert table.shape == (1, 17, 32)
    torch.testing.assert_close(table[0, 1:].double(), reference(32, 4, 1.0), atol=1e-7, rtol=0)


def test_half_precision_res_computed_in_float32():
    res = torch.tensor([3.0, 1.5], dtype=torch.bfloat16)
    table = gsd_sincos_pos_embed(64, 14, res, cls_token=False)
    assert table.dtype == torch.float32
    torch.testing.assert_close(table[0].double(), reference(64, 14, 3.0), atol=1e-5, rtol=0)


def test_float64_res_gives_float64_table():
    table = gsd_sincos_pos_embed(16, 2, torch.tensor([2.0], dtype=torch.float64), cls_token=False)
    assert table.dtype == torch.float64
    torch.testing.assert_close(table[0], reference(16, 2, 2.0), atol=1e-12, rtol=0)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="divisible by 4"):
        gsd_sincos_pos_embed(18, 2, torch.ones(1))
    with pytest.raises(ValueError, match="1-D"):
        gsd_sincos_pos_embed(16, 2, torch.ones(2, 1))
