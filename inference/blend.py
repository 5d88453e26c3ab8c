"""Sliding-window prediction with overlap and smooth blending, one horizontal strip of the output at a time.

The output rows of a tile are cut into strips of ``stride`` rows (:func:`strip_bounds`); a strip's values come from
every window row that meets it (:func:`rows_meeting`), each window's class probabilities weighted by
:func:`blend_weights` (a linear ramp over ``overlap`` px at each edge, positive everywhere, so every pixel has
weight) and divided by the summed weight. A strip therefore depends only on its own windows: strips are computed
in any order, on any rank, and resumed independently. Consecutive strips of a tile on one rank share the window
rows that cross their boundary: with a ``cache``, :func:`blend_strip` keeps those windows' rows below the strip and
the next strip reuses them, so each window is predicted once per run of consecutive strips (without it, about twice
with overlap). Memory is one strip (``K x stride x width`` float32 plus ``stride x width`` weights), a window batch,
and the cache: the part below the strip of the window rows crossing its lower edge, ``K x overlap x (columns x
size)`` float32 on the regular stride grid (more near the bottom edge, where the last window row is moved back: at
most ``ceil(size / stride)`` window rows of fewer than ``size`` rows each).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

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
                weights: np.ndarray, batch: int,
                cache: Optional[dict[int, Any]] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities [K, b - a, width] float32, valid [b - a, width] bool)`` of output rows ``[a, b)``.

    ``predict(windows)`` takes ``[(row, col), ...]`` (at most ``batch`` windows of one window row) and returns
    ``(probs [N, K, S, S], valid [N, S, S])``. Windows may reach past the output on any side (rows before 0 or past
    the strip, columns before 0 or past ``width``: a mosaic tile's windows reaching into its neighbours); only their
    pixels inside are blended.

    ``cache`` (a dict, fresh per tile, passed to the calls for consecutive strips): on return it holds, for each
    window row that reaches below ``b``, its windows' probabilities and validity from row ``b`` down (keyed by the
    window row start); the next strip ``[b, ...)`` blends those instead of predicting them again. Entries kept
    for another first row (a strip skipped or done elsewhere) are not used: those window rows are predicted anew.
    The result is the same with or without a cache (each window is always predicted in the same batch).
    """
    # float32 sums of at most a few weighted probabilities; divided in place: the strip is held once, K x rows x width
    acc, wsum, valid = None, np.zeros((b - a, width), np.float32), np.zeros((b - a, width), bool)
    kept: dict[int, Any] = {}

    def windows_of(r: int, top: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(col, probs [K, rows, cols], valid [rows, cols])`` of window row ``r`` from output row ``top`` down,
        clipped to ``[0, width)``: from the cache when it holds them from ``top``, else predicted a batch at a
        time (the batches of a window row are always the same ones)."""
        hit = cache.get(r) if cache is not None else None
        if hit is not None and hit[0] == top:
            yield from hit[1]
            return
        step = max(batch, 1)
        for i in range(0, len(col_starts), step):
            chunk = list(col_starts[i:i + step])
            probs, ok = predict([(r, c) for c in chunk])
            for c, p, v in zip(chunk, probs, ok):
                left, right = max(0, c), min(width, c + size)  # may start before column 0 / end past width
                yield c, p[:, top - r:, left - c:right - c], v[top - r:, left - c:right - c]

    for r in rows_meeting(row_starts, size, a, b):
        top, hi = max(a, r), min(b, r + size)  # this strip's rows of window row r
        n, rest = hi - top, []
        for c, p, v in windows_of(r, top):
            if acc is None:
                acc = np.zeros((p.shape[0], b - a, width), np.float32)
            left, right = max(0, c), min(width, c + size)
            w = weights[top - r:hi - r, left - c:right - c]
            acc[:, top - a:hi - a, left:right] += p[:, :n] * w
            wsum[top - a:hi - a, left:right] += w
            valid[top - a:hi - a, left:right] |= v[:n]
            if cache is not None and r + size > b:  # the rows a later strip still needs; copies: the batch is freed
                rest.append((c, p[:, n:].copy(), v[n:].copy()))
        if rest:
            kept[r] = (b, rest)
    if cache is not None:
        cache.clear()
        cache.update(kept)
    acc /= np.maximum(wsum, 1e-12)
    return acc, valid
