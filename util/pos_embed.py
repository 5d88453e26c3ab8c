"""GSD-scaled 2-D sin-cos positional embeddings (Scale-MAE's "GSDPE").

Scale-MAE multiplies the integer patch-grid positions inside MAE's fixed sin-cos embedding by a per-sample
relative ground sample distance ``res``: a token at row ``r``, column ``c`` is embedded at ``(c * res, r * res)``.
``res == 1`` is MAE's standard table. The embedding layout follows MAE: for width ``E`` the first ``E/2``
channels encode the column position, the last ``E/2`` the row position, each as ``[sin(pos * w), cos(pos * w)]``
with ``w_k = 1 / 10000 ** (k / (E/4))``.

The per-sample tables are computed in float32 with the same operation order as the original (positions scaled
first, then multiplied by the frequencies), so they agree with it to float rounding; float64 is used only when the
caller asks for it (e.g. for the stored ``pos_embed`` buffer, which MAE fills from a float64 numpy table).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["gsd_sincos_pos_embed", "sincos_pos_embed_table"]


def _frequencies(quarter: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``w_k = 1 / 10000 ** (k / quarter)`` for ``k < quarter``: [quarter]."""
    exponent = torch.arange(quarter, dtype=dtype, device=device) / quarter
    return 1.0 / 10000**exponent


def gsd_sincos_pos_embed(
    embed_dim: int,
    grid_size: int,
    res: torch.Tensor,
    cls_token: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-sample GSD-scaled 2-D sin-cos positional embedding.

    Args:
        embed_dim: embedding width ``E`` (must be divisible by 4).
        grid_size: tokens per side ``G`` of the square patch grid.
        res: relative GSD per sample, shape ``[N]`` (any float dtype, on the device the table is wanted on).
        cls_token: prepend an all-zero row for the cls token (it never gets positional information).
        dtype: computation/output dtype; default float32 (float64 when ``res`` is float64). Half-precision
            inputs are computed in float32 because ``sin`` of large arguments loses all accuracy in 16 bits.

    Returns:
        ``[N, G*G (+1), E]`` with token index ``r * G + c`` (row-major, as the patch embedding flattens).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    if res.dim() != 1:
        raise ValueError(f"res must be a 1-D tensor of per-sample values, got shape {tuple(res.shape)}")
    if dtype is None:
        dtype = torch.float64 if res.dtype == torch.float64 else torch.float32
    device = res.device
    res = res.to(dtype)
    quarter = embed_dim // 4

    index = torch.arange(grid_size, dtype=dtype, device=device)
    # positions[n, i] = i * res[n], shared by rows and columns: [N, G]
    positions = res[:, None] * index[None, :]
    angles = positions[:, :, None] * _frequencies(quarter, dtype, device)  # [N, G, E/4]
    axis_embed = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [N, G, E/2]

    n = res.shape[0]
    col = axis_embed[:, None, :, :].expand(n, grid_size, grid_size, embed_dim // 2)  # varies along columns
    row = axis_embed[:, :, None, :].expand(n, grid_size, grid_size, embed_dim // 2)  # varies along rows
    table = torch.cat([col, row], dim=-1).reshape(n, grid_size * grid_size, embed_dim)
    if cls_token:
        table = torch.cat([table.new_zeros(n, 1, embed_dim), table], dim=1)
    return table


def sincos_pos_embed_table(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed ``res = 1`` table ``[1, G*G (+1), E]`` (float32, computed in float64 like MAE's numpy code).

    Used to fill the stored-but-unused ``pos_embed`` buffer so that freshly initialised checkpoints carry the same
    values as the original's.
    """
    ones = torch.ones(1, dtype=torch.float64)
    return gsd_sincos_pos_embed(embed_dim, grid_size, ones, cls_token=cls_token).float()
