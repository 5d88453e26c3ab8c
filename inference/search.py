"""Similarity search over an embedding file of ``main_embed.py``: a query window (by row, or the window under a
point) -> the ``k`` most similar windows across every GSD of the file, by cosine similarity, with their footprints."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["cosine_top_k", "window_at", "search"]


def cosine_top_k(vectors: np.ndarray, query: np.ndarray, k: int, exclude: Sequence[int] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [k'], scores [k'])`` of the rows of ``vectors`` [N, D] most cosine-similar to ``query`` [D], best
    first (ties: lower index first), leaving out the rows ``exclude``; ``k' = min(k, N - len(exclude))``."""
    v = np.asarray(vectors, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    scores = v @ q / np.maximum(np.linalg.norm(v, axis=1) * np.linalg.norm(q), 1e-12)
    keep = np.ones(len(v), bool)
    keep[list(exclude)] = False
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((idx, -scores[idx]))][:max(int(k), 0)]
    return order, scores[order]


def window_at(gdf, x: float, y: float, crs: Optional[str] = None, gsd: Optional[float] = None) -> int:
    """Position (0-based row of ``gdf``) of the window containing the point ``(x, y)`` (in ``crs``, default the
    file's; a point on an edge or corner that windows share belongs to each): among the windows of ``gsd``
    (default: the finest GSD with one), the one whose centre is nearest, the first row on a tie. ``ValueError``
    when no window contains the point."""
    import shapely
    from pyproj import Transformer

    if gdf.crs is None or gdf.geometry.is_empty.all():
        raise ValueError("--point: the file's windows have no footprint (embeddings of plain images, no "
                         "georeferencing); query by row with --window")
    if crs is not None:
        x, y = Transformer.from_crs(crs, gdf.crs, always_xy=True).transform(x, y)
    point = shapely.Point(x, y)
    hits = np.flatnonzero(shapely.intersects_xy(np.asarray(gdf.geometry.values, dtype=object), x, y))  # edges too
    if gsd is not None:
        have = np.unique(gdf["gsd"].to_numpy())
        if not np.isclose(have, gsd).any():
            raise ValueError(f"--gsd {gsd:g}: the file has windows at gsd {', '.join(f'{g:g}' for g in have)} only")
        hits = hits[np.isclose(gdf["gsd"].to_numpy()[hits], gsd)]
    if len(hits) == 0:
        x0, y0, x1, y1 = gdf.total_bounds
        raise ValueError(f"no window{'' if gsd is None else f' at gsd {gsd:g}'} contains the point ({x:.6g}, {y:.6g})"
                         f" in {gdf.crs.to_string() if gdf.crs else 'the file CRS'}; the windows cover x {x0:.6g} .. "
                         f"{x1:.6g}, y {y0:.6g} .. {y1:.6g}: check --point (x y; lon lat for EPSG:4326), "
                         f"--point_crs and --gsd")
    finest = gdf["gsd"].to_numpy()[hits].min()
    hits = hits[gdf["gsd"].to_numpy()[hits] == finest]
    dist = shapely.distance(shapely.centroid(np.asarray(gdf.geometry.values[hits], dtype=object)), point)
    return int(hits[int(np.argmin(dist))])


def search(path: str | Path, k: int = 10, index: Optional[int] = None, point: Optional[tuple[float, float]] = None,
           crs: Optional[str] = None, gsd: Optional[float] = None, column: Optional[str] = None):
    """``(query row, GeoDataFrame of the k best other windows with a ``score`` column)`` of an embedding file.

    The query is row ``index`` of the file or the window under ``point`` (:func:`window_at`); the results come from
    every GSD of the file, the query window itself left out.
    """
    from inference.geoparquet import read_embeddings

    if (index is None) == (point is None):
        raise ValueError("give a query: a window row (index) or a point, not both")
    gdf, vectors, column = read_embeddings(path, column)
    if index is None:
        index = window_at(gdf, point[0], point[1], crs, gsd)
    if not 0 <= index < len(gdf):
        raise ValueError(f"window row {index} is outside the file's {len(gdf)} windows")
    order, scores = cosine_top_k(vectors, vectors[index], k, exclude=[index])
    hits = gdf.iloc[order].drop(columns=[c for c in gdf.columns if c.startswith("embedding_")]).copy()
    hits.insert(0, "score", scores)
    hits.insert(0, "window", order)
    return gdf.iloc[index], hits
