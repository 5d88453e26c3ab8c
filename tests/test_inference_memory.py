"""What keeps the inference launchers' memory bounded by the window batch, not the raster (issue 20): GDAL's block
cache capped unless the user sets GDAL_CACHEMAX, and the GeoParquet file of main_embed.py streamed row group by
row group. The RSS measurements themselves are bench/bench_embed.py and bench/bench_predict.py (no timing here)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine

import harness
import main_embed
import main_predict
from inference.tiling import GDAL_CACHE_MIB
from tests.raster_reference import fake_values, write_tile

MIB = 2**20


@pytest.fixture
def gdal_cache():
    """GDAL's block cache limit (bytes) as a getter/setter; the process's limit is restored afterwards."""
    from rasterio.env import get_gdal_config, set_gdal_config

    before = int(get_gdal_config("GDAL_CACHEMAX"))
    yield lambda value=None: (set_gdal_config("GDAL_CACHEMAX", int(value)) if value is not None
                              else int(get_gdal_config("GDAL_CACHEMAX")))
    set_gdal_config("GDAL_CACHEMAX", before)


@pytest.mark.parametrize("launcher", ["embed", "predict"])
def test_launchers_cap_gdal_cache_unless_gdal_cachemax_is_set(launcher, gdal_cache, monkeypatch, tmp_path):
    missing = str(tmp_path / "missing.tif")  # the launcher stops at --input, after the cap and before any read
    mod, argv = ((main_embed, ["--input", missing, "--checkpoint_path", "x.pth", "--output",
                               str(tmp_path / "o.parquet"), "--device", "cpu"]) if launcher == "embed" else
                 (main_predict, ["--input", missing, "--resume", "x.pth", "--output_dir", str(tmp_path / "o"),
                                 "--device", "cpu"]))
    args = lambda: mod.get_args_parser().parse_args(argv)  # noqa: E731
    for user in (None, "1000"):
        gdal_cache(1000 * MIB)  # GDAL's default here would be 5 % of the RAM: a value the cap differs from
        if user is None:
            monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
        else:
            monkeypatch.setenv("GDAL_CACHEMAX", user)
        with pytest.raises(harness.UserError, match="missing.tif: not found"):
            mod.main(args())
        assert gdal_cache() == (GDAL_CACHE_MIB * MIB if user is None else 1000 * MIB)
    assert GDAL_CACHE_MIB < 1000


def test_embeddings_streamed_in_row_groups_equal_one_group(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd
    import models_mae

    torch.manual_seed(0)
    ckpt = tmp_path / "mae.pth"
    torch.save({"model": models_mae.MODELS["mae_vit_tiny_patch16"]().state_dict(),
                "args": {"model": "mae_vit_tiny_patch16"}}, ckpt)
    utm = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 4200000.0)
    raster = write_tile(tmp_path / "utm.tif", fake_values(3, 96, 128, seed=1), utm, "EPSG:32610")

    def run(name: str, rows_per_group: int) -> Path:
        monkeypatch.setattr(main_embed, "ROWS_PER_GROUP", rows_per_group)
        out = tmp_path / name
        main_embed.main(main_embed.get_args_parser().parse_args(
            ["--input", str(raster), "--checkpoint_path", str(ckpt), "--input_size", "32", "--scale", "3000",
             "--gsd", "1", "2", "--output", str(out), "--device", "cpu", "--batch_size", "4"]))
        return out

    one, streamed = run("one.parquet", 10**6), run("streamed.parquet", 5)
    # blocks of 4, 4, 4 windows (1 m) then 2, 2 (2 m): groups of >= 5 rows -> 8, 6, 2
    assert pq.ParquetFile(one).num_row_groups == 1
    assert [pq.ParquetFile(streamed).metadata.row_group(i).num_rows for i in range(3)] == [8, 6, 2]
    a, b = gpd.read_parquet(one), gpd.read_parquet(streamed)
    assert len(a) == 16 and a.drop(columns="geometry").equals(b.drop(columns="geometry"))
    assert a.geometry.geom_equals(b.geometry).all() and b.crs.to_epsg() == 32610
    geo = [json.loads(pq.read_schema(p).metadata[b"geo"]) for p in (one, streamed)]
    assert geo[0] == geo[1] and geo[1]["columns"]["geometry"]["geometry_types"] == ["Polygon"]
    np.testing.assert_array_equal(geo[1]["columns"]["geometry"]["bbox"], b.total_bounds)  # all windows, both GSDs
    assert b.total_bounds.tolist() == [500000.0, 4200000.0 - 96, 500000.0 + 128, 4200000.0]
