"""Sliding-window prediction with overlap and smooth blending, one horizontal strip of the output at a time.

The output rows of a tile are cut into strips of ``stride`` rows (:func:`strip_bounds`); a strip's values come from
every window row that meets it (:func:`rows_meeting`), each window's class probabilities weighted by
:func:`blend_weights` (a linear ramp over ``overlap`` px at each edge, positive everywhere, so every pixel has
weight) and divided by the summed weight. A strip therefore depends only on its own windows: strips are computed
in any order, on any rank, and resumed independently; memory is one strip (``K x stride x width`` float32 plus
``stride x width`` weights) plus a window batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["blend_weights", "strip_bounds", "rows_meeting", "blend_strip"]


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """``[size, size]`` float32 window weights: 1 inside, ramping linearly to ``0.5 / overlap`` over the ``overlap``
    px next to each edge (all ones without overlap)."""
    i = np.arange(size, dtype=np.float64) + 0.5
    ramp = np.ones(size) if overlap <= 0 else np.minimum(1.0, np.minimum(i, size - i) / overlap)
    return np.outer(ramp, ramp).astype(np.float32)


def strip_bounds(height: int, stride: int) -> list[tuple[int, int]]:
    """``[(row0, row1), ...]`` strips of ``stride`` rows covering ``height`` rows."""
    return [(a, min(a + stride, height)) for a in range(0, height, stride)]


def rows_meeting(starts: Sequence[int], size: int, a: int, b: int) -> list[int]:
    """Window row starts (of ``size`` px) that meet output rows ``[a, b)``."""
    return [r for r in starts if r < b and r + size > a]


def blend_strip(predict: Callable[[list[tuple[int, int]]], tuple[np.ndarray, np.ndarray]],
                row_starts: Sequence[int], col_starts: Sequence[int], width: int, size: int, a: int, b: int,
                weights: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities [K, b - a, width] float32, valid [b - a, width] bool)`` of output rows ``[a, b)``.

    ``predict(windows)`` takes ``[(row, col), ...]`` and returns ``(probs [N, K, S, S], valid [N, S, S])``.
    Windows may reach past the output on any side (rows before 0 or past the strip, columns before 0 or past
    ``width``: a mosaic tile's windows reaching into its neighbours); only their pixels inside are blended.
    """
    # float32 sums of at most a few weighted probabilities; divided in place: the strip is held once, K x rows x width
    acc, wsum, valid = None, np.zeros((b - a, width), np.float32), np.zeros((b - a, width), bool)
    todo = [(r, c) for r in rows_meeting(row_starts, size, a, b) for c in col_starts]
    for i in range(0, len(todo), max(batch, 1)):
        chunk = todo[i:i + batch]
        probs, ok = predict(chunk)
        if acc is None:
            acc = np.zeros((probs.shape[1], b - a, width), np.float32)
        for (r, c), p, v in zip(chunk, probs, ok):
            lo, hi = max(a, r), min(b, r + size)
            left, right = max(0, c), min(width, c + size)  # a window may start before column 0 / end past width
            rows, cols = slice(lo - r, hi - r), slice(left - c, right - c)
            acc[:, lo - a:hi - a, left:right] += p[:, rows, cols] * weights[rows, cols]
            wsum[lo - a:hi - a, left:right] += weights[rows, cols]
            valid[lo - a:hi - a, left:right] |= v[rows, cols]
    acc /= np.maximum(wsum, 1e-12)
    return acc, valid
