"""inference/search.window_at: which window a query point picks (points on shared edges and corners included)."""
from __future__ import annotations

import geopandas as gpd
import pytest
import shapely


def grid(gsd: float, n: int, side: float) -> list[dict]:
    return [{"gsd": gsd, "geometry": shapely.box(c * side, -(r + 1) * side, (c + 1) * side, -r * side)}
            for r in range(n) for c in range(n)]


def test_window_at_points_inside_on_edges_and_outside():
    from inference.search import window_at

    # 4 x 4 windows of 32 m at 0.5 m, then 2 x 2 windows of 64 m at 1 m over the same 128 m square
    gdf = gpd.GeoDataFrame(grid(0.5, 4, 32.0) + grid(1.0, 2, 64.0), crs="EPSG:32610")
    assert window_at(gdf, 40.0, -10.0) == 1                      # inside window (row 0, col 1) at the finest GSD
    assert window_at(gdf, 40.0, -10.0, gsd=1.0) == 16            # the 1 m window holding it
    # the corner shared by four windows (a quadrant's centre): one of them, the first row on the tie
    assert window_at(gdf, 64.0, -64.0) == 5
    assert window_at(gdf, 32.0, -5.0) == 0                       # on the edge of windows 0 and 1
    assert window_at(gdf, 128.0, -128.0) == 15                   # the raster's outer corner still belongs to it
    with pytest.raises(ValueError, match="no window contains the point"):
        window_at(gdf, 128.5, -10.0)
    with pytest.raises(ValueError, match="--gsd 2: the file has windows at gsd 0.5, 1 only"):
        window_at(gdf, 10.0, -10.0, gsd=2.0)
