"""Inference on whole rasters (issue 20): the tiling core, main_embed.py's GeoParquet output, sharding, resume,
bad input, similarity search. Tiny MAE, rasters of a few hundred px (UTM, Web Mercator, band files)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine

import harness
import main_embed
from inference.tiling import Block, BlockStore, StoreMismatch, axis_starts, shard, window_grid
from tests.cli import one_error_line
from tests.raster_reference import fake_values, write_tile

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # window px: a 2 x 2 patch grid for the patch-16 tiny model
UTM = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 4200000.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    import models_mae

    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    mae = models_mae.MODELS["mae_vit_tiny_patch16"]()
    ckpt = root / "mae.pth"
    torch.save({"model": mae.state_dict(), "args": {"model": "mae_vit_tiny_patch16"}}, ckpt)
    arr = fake_values(3, 96, 128, seed=1)
    utm = write_tile(root / "utm.tif", arr, UTM, "EPSG:32610")
    scene = root / "scenes" / "S1"
    for b in range(3):  # the same pixels as band files of one scene
        write_tile(scene / f"S1_B{b + 1}.tif", arr[b:b + 1], UTM, "EPSG:32610")
    merc = write_tile(root / "merc.tif", fake_values(3, 96, 96, seed=2),
                      Affine(1.25, 0.0, 1113194.9, 0.0, -1.25, 6446275.8), "EPSG:3857")  # ~0.8 m ground at 50 N
    write_tile(root / "nocrs.tif", arr, UTM, None)
    write_tile(root / "four.tif", fake_values(4, 64, 64, seed=3), UTM, "EPSG:32610")
    return {"root": root, "ckpt": ckpt, "utm": utm, "scenes": root / "scenes", "merc": merc, "arr": arr}


def embed_args(w: dict, out: Path, *extra: str, source: str | None = None) -> list[str]:
    return ["--input", source or str(w["utm"]), "--checkpoint_path", str(w["ckpt"]), "--input_size", str(SIZE),
            "--scale", "3000", "--output", str(out), "--device", "cpu", "--batch_size", "4", *extra]


def run_embed(argv: list[str]) -> dict:
    return main_embed.main(main_embed.get_args_parser().parse_args(argv))


def launch(argv: list[str], env: dict | None = None, torchrun: bool = False,
           script: str = "main_embed.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun
                              else []) + [str(REPO / script), *argv]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**base, **(env or {})})


# ------------------------------------------------------------------------------------------- tiling core
def test_window_grid_covers_every_pixel_and_shards_partition_the_rows():
    assert axis_starts(100, 32, 32) == [0, 32, 64, 68]  # the last window moved back inside
    assert axis_starts(96, 32, 16) == [0, 16, 32, 48, 64]
    assert axis_starts(31, 32, 32) == []
    grid = window_grid([(70, 100), (20, 20)], 32, 32)
    cover = np.zeros((70, 100), bool)
    for t, r, c in grid:
        assert t == 0 and r + 32 <= 70 and c + 32 <= 100
        cover[r:r + 32, c:c + 32] = True
    assert cover.all()
    blocks = [Block(0, 0, r) for r in range(7)]
    parts = [shard(blocks, k, 3) for k in range(3)]
    assert sorted(b for p in parts for b in p) == blocks and sum(map(len, parts)) == 7


def test_block_store_resumes_only_with_the_same_settings(tmp_path):
    store = BlockStore(tmp_path / "x.blocks")
    assert store.open({"gsd": [1.0]}) == 0
    b = Block(0, 0, 32)
    store.save(b, {"vec": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert store.done(b) and not store.done(Block(0, 0, 0))
    np.testing.assert_array_equal(store.load(b)["vec"], np.arange(6).reshape(2, 3))
    assert BlockStore(store.folder).open({"gsd": [1.0]}) == 1
    with pytest.raises(StoreMismatch, match="gsd"):
        BlockStore(store.folder).open({"gsd": [2.0]})
    assert sorted(p.name for p in store.folder.iterdir()) == [f"{b.key}.npz", "manifest.json"]  # no temp files


# ------------------------------------------------------------------------------------------- embeddings
def _direct(w: dict, image: np.ndarray, res: float) -> dict[str, np.ndarray]:
    """The encoder's own forward of one window's raw pixels [C, S, S] at ``res`` (no launcher code)."""
    import models_vit
    from util.weights import IMAGENET_MEAN, IMAGENET_STD

    enc = models_vit.import_encoder(str(w["ckpt"])).eval()
    x = torch.from_numpy(image.astype(np.float32) / 3000.0)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        tokens = enc.forward_features(x[None], torch.tensor([res]))
    return {"cls": tokens[0, 0].numpy(), "mean": tokens[0, 1:].mean(0).numpy()}


def test_geoparquet_round_trip_equals_the_encoder_forward(world, tmp_path):
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd
    import shapely
    from pyproj import Transformer

    from dataloaders.geotiff import GeoTiffDataset, WindowSpec

    out = tmp_path / "utm.parquet"
    result = run_embed(embed_args(world, out, "--gsd", "1", "2"))
    gdf = gpd.read_parquet(out)
    assert result["windows"] == len(gdf) == 3 * 4 + 2 * 2  # 96x128 px: 3 x 4 windows; at 2 m (48x64) 2 x 2
    assert gdf.crs.to_epsg() == 32610
    assert sorted(set(gdf["gsd"])) == [1.0, 2.0]
    for col in ("embedding_cls", "embedding_mean"):
        assert np.stack(gdf[col]).shape == (len(gdf), 192)
    to_wgs = Transformer.from_crs("EPSG:32610", "EPSG:4326", always_xy=True)
    for _, row in gdf.iterrows():
        cell = row["gsd"]
        x0, y0 = 500000.0 + row["col"] * cell, 4200000.0 - row["row"] * cell
        assert np.allclose(row["geometry"].bounds, (x0, y0 - SIZE * cell, x0 + SIZE * cell, y0), atol=1e-6)
        assert row["geometry"].area == pytest.approx((SIZE * cell) ** 2)
        wgs = shapely.from_wkt(row["footprint_wgs84"])
        lon, lat = to_wgs.transform(x0, y0)
        assert np.allclose(wgs.exterior.coords[0], (lon, lat), atol=1e-9)
        assert row["res"] == pytest.approx(row["gsd_read"] / 1.0)  # reference_gsd = the finest --gsd
        assert row["source"] == str(world["utm"])
    # one window at 1 m: the raw pixels of the file; one at 2 m: the reader's pixels of that window
    r1 = gdf[(gdf["gsd"] == 1.0) & (gdf["row"] == 64) & (gdf["col"] == 32)].iloc[0]
    direct = _direct(world, world["arr"][:, 64:96, 32:64], r1["res"])
    np.testing.assert_allclose(np.asarray(r1["embedding_cls"]), direct["cls"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r1["embedding_mean"]), direct["mean"], atol=1e-5, rtol=1e-5)
    r2 = gdf[gdf["gsd"] == 2.0].iloc[-1]
    ds = GeoTiffDataset(str(world["utm"]), window_size=SIZE, target_gsd=2.0, index_cache=False)
    pixels = ds.read_window(WindowSpec(0, int(r2["row"]), int(r2["col"]), SIZE, SIZE))["image"].numpy()
    direct = _direct(world, pixels, r2["res"])
    np.testing.assert_allclose(np.asarray(r2["embedding_cls"]), direct["cls"], atol=1e-5, rtol=1e-5)
    assert r2["res"] == pytest.approx(2.0, rel=1e-2)  # twice the ground per pixel: twice the res


def test_band_files_and_web_mercator(world, tmp_path):
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd

    run_embed(embed_args(world, tmp_path / "one.parquet", "--pool", "cls"))
    run_embed(embed_args(world, tmp_path / "bands.parquet", "--pool", "cls", "--band_files", "*_B1.tif",
                         "*_B2.tif", "*_B3.tif", "--scene_glob", "*", source=str(world["scenes"])))
    one, bands = gpd.read_parquet(tmp_path / "one.parquet"), gpd.read_parquet(tmp_path / "bands.parquet")
    assert "embedding_mean" not in one.columns
    np.testing.assert_array_equal(np.stack(one["embedding_cls"]), np.stack(bands["embedding_cls"]))
    assert list(bands["geometry"].bounds.itertuples(index=False)) == list(one["geometry"].bounds.itertuples(index=False))
    run_embed(embed_args(world, tmp_path / "merc.parquet", "--gsd", "1.6", source=str(world["merc"])))
    merc = gpd.read_parquet(tmp_path / "merc.parquet")
    assert merc.crs.to_epsg() == 3857 and len(merc) > 0
    assert np.allclose(merc["gsd_read"], 1.6, rtol=1e-2)  # ground metres, not Mercator metres


# --------------------------------------------------------------------- ranks, resume (subprocesses)
@pytest.fixture(scope="module")
def single(world):
    """One process over the UTM raster at two GSDs (the reference file of the next two tests)."""
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    out = world["root"] / "single.parquet"
    proc = launch(embed_args(world, out, "--gsd", "1", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_processes_equal_one(world, single, tmp_path):
    import geopandas as gpd

    out = tmp_path / "ddp.parquet"
    proc = launch(embed_args(world, out, "--gsd", "1", "2"), torchrun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = gpd.read_parquet(single), gpd.read_parquet(out)
    cols = ["tile", "row", "col", "gsd", "gsd_read", "res", "source", "footprint_wgs84"]
    assert a[cols].equals(b[cols]) and a.geometry.geom_equals(b.geometry).all()
    for col in ("embedding_cls", "embedding_mean"):
        np.testing.assert_allclose(np.stack(a[col]), np.stack(b[col]), atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "ddp.parquet.blocks").exists()


def test_resume_after_sigkill_gives_the_same_file(world, single, tmp_path):
    out = tmp_path / "resumed.parquet"
    argv = embed_args(world, out, "--gsd", "1", "2")
    killed = launch(argv, env={"SCALEMAE_FAULT": "after_rename:3:g*.npz"})  # killed after its third block
    assert killed.returncode == -9, killed.stderr[-2000:]
    blocks = out.parent / f"{out.name}.blocks"
    assert not out.exists() and len(list(blocks.glob("*.npz"))) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in blocks.glob("*.npz")}
    resumed = launch(argv + ["--debug"], env={"SCALEMAE_FAULT": "after_rename:1:g00-t00000-r0000000.npz"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]  # the first block is not written again (no kill)
    assert "resuming: 3 of 5 window rows already done" in resumed.stdout
    assert out.read_bytes() == single.read_bytes()
    assert not blocks.exists() and stamps


# ------------------------------------------------------------------------------------------------ bad input
def census(world, tmp_path, capsys, argv: list[str]) -> str:
    return one_error_line(capsys, main_embed.main, main_embed.get_args_parser(), argv)


def test_bad_input_one_line_each(world, tmp_path, capsys):
    existing = tmp_path / "done.parquet"
    existing.write_bytes(b"a finished file")
    cases = [
        (embed_args(world, existing), "exists; pass --overwrite"),
        (embed_args(world, existing, "--overwrite", source=str(world["root"] / "nocrs.tif")), "no CRS"),
        (embed_args(world, tmp_path / "o.parquet", source=str(world["root"] / "four.tif")),
         "4 band(s), but the model takes 3"),
        (embed_args(world, tmp_path / "o.parquet", "--gsd", "0.5", "--no_upsample"), "finer than the raster"),
        (embed_args(world, tmp_path / "o.parquet", "--mean", "0.5"), "--mean: 1 values"),
        (embed_args(world, tmp_path / "o.parquet", source=str(tmp_path / "none" / "*.tif")), "matches no file"),
        (embed_args(world, tmp_path / "o.parquet", "--input_size", "40"), "not a multiple of the model's patch 16"),
        (embed_args(world, tmp_path / "o.txt"), "give a .parquet file name"),
        (embed_args(world, tmp_path / "o.parquet", "--dense", str(tmp_path / "d.png")), "--dense"),
    ]
    for argv, expected in cases:
        line = census(world, tmp_path, capsys, argv)
        assert expected in line, (argv, line)
    assert existing.read_bytes() == b"a finished file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.parquet"]  # nothing written for a refused run
    other = tmp_path / "other" / "o.parquet.blocks"  # blocks of a run with other settings: refused, kept
    BlockStore(other).open({"gsd": [9.0]})
    line = census(world, tmp_path, capsys, embed_args(world, other.parent / "o.parquet"))
    assert "holds the blocks of a run with other settings" in line and "--overwrite" in line
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]


# ------------------------------------------------------------------------------------------------------ search
def test_search_top_k_by_cosine_across_gsds(world, single, tmp_path, capsys):
    import geopandas as gpd
    from pyproj import Transformer

    from inference.search import search
    from tools import search_embeddings

    gdf = gpd.read_parquet(single)
    vecs = np.stack(gdf["embedding_cls"]).astype(np.float64)
    q = 5
    cos = vecs @ vecs[q] / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(vecs[q]))
    expected = [i for i in np.argsort(-cos, kind="stable") if i != q][:4]
    query, hits = search(single, k=4, index=q)
    assert query.name == q and list(hits["window"]) == expected
    np.testing.assert_allclose(hits["score"], cos[expected], rtol=1e-6)
    assert set(gdf["gsd"]) == {1.0, 2.0} and hits.crs == gdf.crs  # footprints kept, in the file's CRS
    # a point (lon/lat) inside window 5 (1 m, row 32, col 32) queries that window at the finest GSD
    row = gdf.iloc[q]
    cx, cy = row.geometry.centroid.x + 3, row.geometry.centroid.y - 2
    lon, lat = Transformer.from_crs("EPSG:32610", "EPSG:4326", always_xy=True).transform(cx, cy)
    out = tmp_path / "hits.geojson"
    hits_cli = harness.run(search_embeddings.main, search_embeddings.get_args_parser(),
                           [str(single), "--point", str(lon), str(lat), "--point_crs", "EPSG:4326", "--k", "4",
                            "--output", str(out)])
    assert list(hits_cli["window"]) == expected
    printed = capsys.readouterr().out
    assert printed.startswith(f"query: window {q} gsd 1") and len(gpd.read_file(out)) == 4
    with pytest.raises(SystemExit) as exc:  # a point outside every window: one line
        harness.run(search_embeddings.main, search_embeddings.get_args_parser(),
                    [str(single), "--point", "0", "0"])
    assert exc.value.code == 2 and "no window contains the point" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- segmentation maps
def test_blended_tiling_equals_a_whole_image_forward_of_a_pointwise_model():
    from inference.blend import blend_strip, blend_weights, strip_bounds

    rng = np.random.default_rng(0)
    image = rng.random((3, 70, 90)).astype(np.float32)
    whole = np.exp(image) / np.exp(image).sum(0)  # a per-pixel "model": softmax over the bands
    for overlap in (0, 8):
        size, stride = 32, 32 - overlap
        weights = blend_weights(size, overlap)
        assert (weights > 0).all() and (overlap or (weights == 1).all())

        def predict(windows):
            crops = np.stack([image[:, r:r + size, c:c + size] for r, c in windows])
            return np.exp(crops) / np.exp(crops).sum(1, keepdims=True), np.ones((len(windows), size, size), bool)

        strips = [blend_strip(predict, axis_starts(70, size, stride), axis_starts(90, size, stride), 90, size, a, b,
                              weights, 5)[0] for a, b in strip_bounds(70, stride)]
        np.testing.assert_allclose(np.concatenate(strips, axis=1), whole, rtol=1e-5, atol=1e-6)


def test_strip_cache_predicts_each_window_once_with_the_same_result():
    from collections import Counter

    from inference.blend import blend_strip, blend_weights, strip_bounds
    from inference.tiling import runs

    rng = np.random.default_rng(1)
    image = rng.random((3, 70, 90)).astype(np.float32)
    size, overlap = 32, 20  # overlap > stride: a window row meets three strips (two of them from the cache)
    stride, weights = size - overlap, blend_weights(size, overlap)
    rows, cols = axis_starts(70, size, stride, before=True), axis_starts(90, size, stride)
    padded = np.pad(image, ((0, 0), (size, 0), (0, 0)), mode="reflect")  # window rows before 0 (a mosaic top)

    def run(strips, cache):
        seen = Counter()

        def predict(windows):
            assert 0 < len(windows) <= 5 and len({r for r, _ in windows}) == 1  # one window row per batch
            seen.update(windows)
            crops = np.stack([padded[:, size + r:2 * size + r, c:c + size] for r, c in windows])
            return np.exp(crops) / np.exp(crops).sum(1, keepdims=True), crops[:, 0] > 0.05
        out = [blend_strip(predict, rows, cols, 90, size, a, b, weights, 5, cache=cache) for a, b in strips]
        return out, seen

    strips = strip_bounds(70, stride)
    plain, plain_seen = run(strips, None)
    cached, seen = run(strips, {})
    for (p, v), (q, u) in zip(plain, cached):
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(v, u)
    assert set(seen) == {(r, c) for r in rows for c in cols} and set(seen.values()) == {1}
    assert max(plain_seen.values()) == 3  # without the cache: up to three times
    # two ranks, one contiguous run each: each window once per run, the first strip of a run from scratch
    halves = [runs(strips, k, 2) for k in (0, 1)]
    assert halves[0] + halves[1] == strips and abs(len(halves[0]) - len(halves[1])) <= 1
    second, seen = run(halves[1], {})
    for (p, _), (q, _) in zip(second, cached[len(halves[0]):]):
        np.testing.assert_array_equal(p, q)
    assert set(seen.values()) == {1}
    # a cache left by a strip that is not the one just before is not used
    cache: dict = {}
    run(strips[:1], cache)
    (p, _), = run(strips[2:3], cache)[0]
    np.testing.assert_array_equal(p, cached[2][0])


@pytest.fixture(scope="module")
def segmenter(world):
    import models_seg

    torch.manual_seed(0)
    model = models_seg.build_segmentation_model("vit_tiny_patch16", 3, img_size=SIZE, channels=16, aux_channels=0)
    with torch.no_grad():  # a sharper classifier: every class is predicted somewhere (foreground for polygons)
        model.decode_head.conv_seg.weight.mul_(50.0)
        model.decode_head.conv_seg.bias.zero_()
    path = world["root"] / "seg.pth"
    torch.save({"model": model.state_dict(), "classes": ["background", "a", "b"], "writer": "main_segment",
                "args": {"model": "vit_tiny_patch16", "input_size": SIZE, "head_channels": 16, "aux_channels": 0,
                         "out_indices": None, "base_resolution": 1.0}}, path)
    return model.eval(), path


def test_predicted_geotiff_keeps_georeferencing_and_nodata(world, segmenter, tmp_path, capsys):
    import main_predict
    import rasterio

    model, ckpt = segmenter
    arr = fake_values(3, 64, 80, seed=4, nodata=0, holes=2)
    src = write_tile(tmp_path / "holes.tif", arr, UTM, "EPSG:32610", nodata=0)
    one = write_tile(tmp_path / "one.tif", arr[:, :SIZE, :SIZE], UTM, "EPSG:32610")
    argv = ["--resume", str(ckpt), "--scale", "3000", "--device", "cpu", "--overlap", "8", "--batch_size", "3"]
    main_predict.main(main_predict.get_args_parser().parse_args(
        ["--input", str(src), "--output_dir", str(tmp_path / "out"), *argv]))
    with rasterio.open(tmp_path / "out" / "holes_pred.tif") as dst, rasterio.open(src) as ref:
        assert (dst.crs, dst.transform, dst.shape) == (ref.crs, ref.transform, ref.shape)
        assert dst.nodata == 255 and dst.dtypes[0] == "uint8" and dst.profile["tiled"]
        assert dst.compression.value.lower() == "deflate"
        pred = dst.read(1)
    holes = (arr == 0).any(0)
    assert holes.any() and (pred[holes] == 255).all() and (pred[~holes] < 3).all()
    assert not (tmp_path / "out" / ".predict.blocks").exists()
    # a raster of one window: the model's own forward on its pixels
    main_predict.main(main_predict.get_args_parser().parse_args(
        ["--input", str(one), "--output_dir", str(tmp_path / "one"), *argv]))
    from util.weights import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(arr[:, :SIZE, :SIZE].astype(np.float32) / 3000.0)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        direct = model(x[None], torch.tensor([1.0]))[0].argmax(0).numpy()
    with rasterio.open(tmp_path / "one" / "one_pred.tif") as dst:
        np.testing.assert_array_equal(dst.read(1), direct)
    before = (tmp_path / "one" / "one_pred.tif").read_bytes()
    with pytest.raises(SystemExit) as exc:
        harness.run(main_predict.main, main_predict.get_args_parser(),
                    ["--input", str(one), "--output_dir", str(tmp_path / "one"), *argv])
    err = capsys.readouterr()
    assert exc.value.code == 2 and "exists; pass --overwrite" in err.err and "Traceback" not in err.err + err.out
    assert (tmp_path / "one" / "one_pred.tif").read_bytes() == before


# ------------------------------------------------------------------------------- exported encoder, bad input (2)
def test_exported_encoder_gives_the_pretraining_checkpoints_embeddings(world, tmp_path):
    """tools/export_encoder.py output (.pth + sidecar, .safetensors): the same embeddings as the checkpoint it came
    from (models_vit recomputes the positional embedding from ``res``; the stored table at the export's res is not
    used), normalised with the mean/std the export recorded."""
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd

    from util.weights import export_encoder

    mean, std = ["0.4", "0.5", "0.6"], ["0.2", "0.25", "0.3"]
    paths = export_encoder(str(world["ckpt"]), tmp_path / "enc", res=2.0, mean=[float(v) for v in mean],
                           std=[float(v) for v in std])["paths"]
    ref = tmp_path / "ref.parquet"
    run_embed(embed_args(world, ref, "--gsd", "2", "--mean", *mean, "--std", *std))
    a = gpd.read_parquet(ref)
    default = run_embed(embed_args(world, tmp_path / "imagenet.parquet", "--gsd", "2"))["output"]
    assert not np.allclose(np.stack(gpd.read_parquet(default)["embedding_cls"]), np.stack(a["embedding_cls"]),
                           atol=1e-3)  # the recorded stats matter: ImageNet's give other embeddings
    for kind in ("pth", "safetensors"):
        out = tmp_path / f"{kind}.parquet"
        argv = embed_args(world, out, "--gsd", "2")
        argv[argv.index("--checkpoint_path") + 1] = str(paths[kind])
        run_embed(argv)
        b = gpd.read_parquet(out)
        assert a[["row", "col", "gsd", "res"]].equals(b[["row", "col", "gsd", "res"]])
        for col in ("embedding_cls", "embedding_mean"):
            np.testing.assert_allclose(np.stack(b[col]), np.stack(a[col]), atol=1e-5, rtol=1e-5)


def test_upsampling_warns_once_and_a_recorded_dtype_is_checked(world, tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import rasterio

    from inference.inputs import check_dtype
    from inference.tiling import open_scene

    run_embed(embed_args(world, tmp_path / "up.parquet", "--gsd", "0.5", "0.75", "1", "--pool", "cls"))
    out = capsys.readouterr().out
    warnings_ = [ln for ln in out.splitlines() if "WARNING" in ln]
    assert len(warnings_) == 1 and warnings_[0].startswith("WARNING: --gsd 0.5 0.75: finer than the raster"), out
    run_embed(embed_args(world, tmp_path / "native.parquet", "--gsd", "1", "--pool", "cls"))
    assert "WARNING" not in capsys.readouterr().out

    with rasterio.open(world["utm"]) as src:
        have = src.dtypes[0]
    other = "uint8" if have != "uint8" else "uint16"
    ckpt = torch.load(world["ckpt"], weights_only=False)
    ckpt["args"] = {**ckpt["args"], "data": {"raster_dtype": other}}
    torch.save(ckpt, tmp_path / "typed.pth")
    argv = embed_args(world, tmp_path / "o.parquet")
    argv[argv.index("--checkpoint_path") + 1] = str(tmp_path / "typed.pth")
    line = census(world, tmp_path, capsys, argv)
    assert f"pixels of dtype {have}, but the checkpoint was trained on {other} rasters" in line, line
    ds = open_scene(str(world["utm"]), None, SIZE)
    check_dtype(ds, {"data": {"raster_dtype": have}}, "x")  # the recorded dtype: accepted
    check_dtype(ds, {"model": "mae_vit_tiny_patch16"}, "x")  # nothing recorded: no check


def test_dense_patch_tokens_geotiff(world, tmp_path):
    """--dense: D bands at 1/16 of the read grid, transform = read-grid transform x patch, each cell the patch token
    of the encoder's direct forward of the window that covers it; one file per GSD."""
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd
    import models_vit
    import rasterio
    from util.weights import IMAGENET_MEAN, IMAGENET_STD

    dense = tmp_path / "dense.tif"
    result = run_embed(embed_args(world, tmp_path / "d.parquet", "--gsd", "1", "2", "--dense", str(dense)))
    paths = [tmp_path / "dense_1m.tif", tmp_path / "dense_2m.tif"]
    assert result["dense"] == [str(p) for p in paths] and all(p.is_file() for p in paths)
    gdf = gpd.read_parquet(tmp_path / "d.parquet")
    with rasterio.open(paths[0]) as src:
        assert (src.count, src.height, src.width, src.dtypes[0]) == (192, 6, 8, "float32")
        assert src.transform == UTM @ Affine.scale(16) and src.crs.to_epsg() == 32610
        cells = src.read()
    with rasterio.open(paths[1]) as src:  # 48 x 64 read grid at 2 m: 3 x 4 cells of 32 m
        assert (src.count, src.height, src.width) == (192, 3, 4)
        assert src.transform == Affine(32.0, 0.0, 500000.0, 0.0, -32.0, 4200000.0)
        coarse = src.read()
    assert np.isfinite(coarse).all() and np.abs(coarse).sum(0).min() > 0  # every cell written
    enc = models_vit.import_encoder(str(world["ckpt"])).eval()
    for r, c in ((0, 0), (64, 96)):
        x = torch.from_numpy(world["arr"][:, r:r + SIZE, c:c + SIZE].astype(np.float32) / 3000.0)
        x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        res = float(gdf[(gdf["gsd"] == 1.0) & (gdf["row"] == r) & (gdf["col"] == c)]["res"].iloc[0])
        with torch.no_grad():
            tokens = enc.forward_features(x[None], torch.tensor([res]))[0, 1:].reshape(2, 2, -1).numpy()
        np.testing.assert_allclose(cells[:, r // 16:r // 16 + 2, c // 16:c // 16 + 2], np.moveaxis(tokens, -1, 0),
                                   atol=1e-5, rtol=1e-5)


def test_plain_image_folder_one_embedding_per_image(world, tmp_path, capsys):
    """A folder of PNGs (no georeferencing): one row per image, empty geometry, the file as source, res of --gsd
    rescaled to the resized pixels; an image of the window size equals the encoder's direct forward."""
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    import geopandas as gpd
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(small).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "b.png")
    out = tmp_path / "photos.parquet"
    argv = embed_args(world, out, "--gsd", "0.5", source=str(folder))
    argv[argv.index("--scale") + 1] = "255"
    assert run_embed(argv)["windows"] == 2
    gdf = gpd.read_parquet(out)
    assert gdf.crs is None and gdf.geometry.isna().all()
    assert list(gdf["source"]) == [str(folder / "a.png"), str(folder / "b.png")]
    assert list(gdf["width"]) == [SIZE, 64] and list(gdf["gsd"]) == [0.5, 0.5]
    assert np.allclose(gdf["res"], [1.0, 2.0]) and np.allclose(gdf["gsd_read"], [0.5, 1.0])  # 64 px shown as 32
    direct = _direct(world, small.transpose(2, 0, 1).astype(np.float64) * (3000.0 / 255.0), 1.0)
    np.testing.assert_allclose(np.asarray(gdf["embedding_cls"].iloc[0]), direct["cls"], atol=1e-5, rtol=1e-5)
    line = census(world, tmp_path, capsys, embed_args(world, tmp_path / "x.parquet", source=str(folder)))
    assert "plain images (no georeferencing) need --gsd with one value" in line, line


def predict_args(ckpt: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(source), "--resume", str(ckpt), "--scale", "3000", "--device", "cpu", "--overlap", "8",
            "--batch_size", "4", "--output_dir", str(out), *extra]


def test_default_gsd_is_the_checkpoints_training_gsd(world, segmenter, tmp_path, capsys):
    import shutil

    import main_predict
    import rasterio

    ckpt = tmp_path / "run" / "checkpoint-latest.pth"
    ckpt.parent.mkdir()
    shutil.copy(segmenter[1], ckpt)
    (ckpt.parent / "config.yaml").write_text("args: {}\ndata: {target_gsd: 2.0, reference_gsd: 1.0}\n")
    run = lambda out, *extra: main_predict.main(main_predict.get_args_parser().parse_args(  # noqa: E731
        predict_args(ckpt, world["utm"], tmp_path / out, *extra)))
    run("trained")
    assert "read grid: 2 m (the training GSD of the checkpoint)" in capsys.readouterr().out
    run("given", "--gsd", "1")
    with rasterio.open(tmp_path / "trained" / "utm_pred.tif") as a, \
            rasterio.open(tmp_path / "given" / "utm_pred.tif") as b:
        assert a.transform == UTM @ Affine.scale(2.0) and a.shape == (48, 64)
        assert b.transform == UTM and b.shape == (96, 128)
    (ckpt.parent / "config.yaml").unlink()  # no training GSD recorded: the raster's own, with a note
    run("native")
    assert "each raster's native GSD" in capsys.readouterr().out
    with rasterio.open(tmp_path / "native" / "utm_pred.tif") as c:
        assert c.transform == UTM


@pytest.fixture(scope="module")
def single_pred(world, segmenter):
    """One process predicting the UTM raster (4 strips of 24 rows): the reference of the next two tests."""
    import main_predict

    out = world["root"] / "pred_single"
    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(segmenter[1], world["utm"], out)))
    return out / "utm_pred.tif"


def _pixels_and_grid(path: Path):
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs, ds.nodata


def test_predict_computes_each_window_once(world, segmenter, single_pred, tmp_path, monkeypatch):
    """Overlapping strips share window rows: one process predicts each of the 4 x 5 windows once (40 before)."""
    import main_predict

    load, batches = main_predict.load_segmenter, []

    def counting(path):
        model, *rest = load(path)
        forward = model.forward
        model.forward = lambda x, res: batches.append(len(x)) or forward(x, res)
        return (model, *rest)
    monkeypatch.setattr(main_predict, "load_segmenter", counting)
    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(segmenter[1], world["utm"], tmp_path)))
    assert axis_starts(96, SIZE, SIZE - 8) == [0, 24, 48, 64] and len(axis_starts(128, SIZE, SIZE - 8)) == 5
    assert sum(batches) == 4 * 5 and max(batches) <= 4
    assert (tmp_path / "utm_pred.tif").read_bytes() == single_pred.read_bytes()


def test_predict_two_processes_equal_one(world, segmenter, single_pred, tmp_path):
    proc = launch(predict_args(segmenter[1], world["utm"], tmp_path), torchrun=True, script="main_predict.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _pixels_and_grid(single_pred), _pixels_and_grid(tmp_path / "utm_pred.tif")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1:] == b[1:] and len(np.unique(a[0])) > 1
    assert not (tmp_path / ".predict.blocks").exists()


def test_predict_resume_after_sigkill_gives_the_same_file(world, segmenter, single_pred, tmp_path):
    argv = predict_args(segmenter[1], world["utm"], tmp_path)
    killed = launch(argv, env={"SCALEMAE_FAULT": "after_rename:2:g*.npz"}, script="main_predict.py")
    assert killed.returncode == -9, killed.stderr[-2000:]
    blocks = tmp_path / ".predict.blocks"
    assert not (tmp_path / "utm_pred.tif").exists() and len(list(blocks.glob("*.npz"))) == 2
    # the first strip is not written again: a fault on its file name would kill the resumed run
    resumed = launch(argv, env={"SCALEMAE_FAULT": "after_rename:1:g00-t00000-r0000000.npz"},
                     script="main_predict.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: 2 of 4 strips already done" in resumed.stdout
    a, b = _pixels_and_grid(single_pred), _pixels_and_grid(tmp_path / "utm_pred.tif")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1:] == b[1:]
    assert (tmp_path / "utm_pred.tif").read_bytes() == single_pred.read_bytes()
    assert not blocks.exists()


def test_predict_optional_outputs_and_cog_layout(world, segmenter, tmp_path):
    import geopandas as gpd
    import main_predict
    import rasterio
    from PIL import Image

    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(
        segmenter[1], world["utm"], tmp_path, "--probabilities", "--polygons", "--preview", "--preview_size", "40",
        "--blocksize", "64")))
    with rasterio.open(tmp_path / "utm_pred.tif") as pred, rasterio.open(tmp_path / "utm_prob.tif") as prob:
        assert (prob.crs, prob.transform, prob.shape, prob.nodata) == (pred.crs, pred.transform, pred.shape, 255)
        assert prob.count == 3 and prob.scales == (1 / 254,) * 3 and prob.descriptions == ("background", "a", "b")
        for ds in (pred, prob):  # COG layout: tiled, internal overviews, the COG driver's layout tag
            assert ds.profile["tiled"] and ds.block_shapes[0] == (64, 64)
            assert ds.overviews(1) == [2] and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        classes, p = pred.read(1), prob.read().astype(np.int32)
    assert (p.sum(0) - 254).__abs__().max() <= 2  # probabilities sum to one (rounding)
    chosen = np.take_along_axis(p, classes[None].astype(np.int64), 0)[0]
    assert (chosen >= p.max(0) - 1).all() and (p.argmax(0) == classes).mean() > 0.95  # the class map's arg-max
    gdf = gpd.read_file(tmp_path / "utm_pred.gpkg")
    assert len(gdf) > 0 and gdf.crs.to_epsg() == 32610 and set(gdf["class_id"]) == set(np.unique(classes)) - {0}
    fg = classes > 0  # the polygons cover exactly the foreground pixels
    assert gdf.area.sum() == pytest.approx(fg.sum() * 1.0)
    preview = Image.open(tmp_path / "utm_preview.png")
    assert preview.size == (40, 30) and preview.mode == "RGBA"


def test_predict_bad_input_one_line_each(world, segmenter, tmp_path, capsys):
    import main_predict

    ckpt = segmenter[1]
    cases = [
        (predict_args(ckpt, world["root"] / "nocrs.tif", tmp_path / "o"), "no CRS"),
        (predict_args(ckpt, world["root"] / "four.tif", tmp_path / "o"), "4 band(s), but the model takes 3"),
        (predict_args(ckpt, world["utm"], tmp_path / "o", "--gsd", "0.5", "--no_upsample"),
         "--gsd 0.5: finer than the raster"),
        (predict_args(ckpt, world["utm"], tmp_path / "o", "--blocksize", "40"), "--blocksize 40: must be"),
        (predict_args(ckpt, world["utm"], tmp_path / "o", "--blocksize", "96"),
         "--blocksize 96: must be a power of two from 64 to 4096"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            harness.run(main_predict.main, main_predict.get_args_parser(), argv)
        captured = capsys.readouterr()
        text = (captured.out + captured.err).strip()
        lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert exc.value.code == 2 and "Traceback" not in text and len(lines) == 1, text
        assert expected in lines[0], (argv, lines[0])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.tif"))
