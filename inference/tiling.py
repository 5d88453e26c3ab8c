"""The tiling core of inference: which windows a scene is cut into, which rank reads which, what is already done.

A *scene* is whatever ``dataloaders.geotiff.GeoTiffDataset`` reads (a raster, a folder / glob of tiles, a mosaic,
band-file scenes): :func:`open_scene` builds it with the read grid at the requested GSD (``target_gsd``), so every
window is read by the project's reader ("one pixel, one value"), never by a second one.

* :func:`axis_starts` / :func:`window_grid` -- windows of ``size`` px every ``stride`` px over each tile's read grid;
  the last window of a row / column is moved back inside the tile, so the grid covers the tile completely; on a
  side where a mosaic tile has a neighbour (:func:`neighbour_sides`) the windows continue past the edge instead
  (:func:`mosaic_margin`);
* :func:`blocks_of` / :func:`shard` -- windows grouped into *blocks* (one row of windows of one tile), the unit of
  sharding over ranks and of resuming; :func:`runs` -- contiguous runs per rank instead (``main_predict``'s
  strips, which share windows with their neighbours);
* :class:`BlockStore` -- a folder of finished blocks, each written atomically (``util.io.atomic_write``), with a
  manifest of the run's settings: a killed run resumes without recomputing the blocks it finished, and a folder
  of other settings is refused.

Memory: a caller holds one block's results at a time and reads its windows ``batch`` at a time (:func:`batches`).
GDAL's block cache (default 5 % of the RAM) also grows with the raster until full: :func:`bound_gdal_cache` caps it
for the inference launchers unless the user sets ``GDAL_CACHEMAX``.
This module imports neither rasterio nor geopandas at import time.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, TypeVar

import numpy as np

from util.io import atomic_write, atomic_write_text

__all__ = ["Block", "open_store", "open_scene", "bound_gdal_cache", "native_gsd", "axis_starts", "mosaic_margin",
           "neighbour_sides", "window_grid", "blocks_of", "shard", "runs", "batches",
           "BlockStore", "StoreMismatch"]

T = TypeVar("T")

# GDAL block cache of the inference launchers when the user sets no GDAL_CACHEMAX: a row of 224 px windows of a
# 3-band uint16 raster 40 000 px wide (256 px tiles) spans ~120 MiB of decoded tiles, so neighbouring windows and the
# next row still share tiles, while GDAL's default (5 % of the RAM: 6.4 GiB on a 128 GiB node) fills with the raster.
GDAL_CACHE_MIB = 256


@dataclass(frozen=True, order=True)
class Block:
    """One row of windows of one tile at one of the run's GSDs (index into the run's GSD list)."""

    gsd_index: int
    tile: int
    row: int

    @property
    def key(self) -> str:
        return f"g{self.gsd_index:02d}-t{self.tile:05d}-r{self.row:07d}"


def open_scene(source: Any, gsd: Optional[float], window: int, *, band_files: Optional[Sequence[str]] = None,
               scene_glob: Optional[str] = None, glob: Optional[str] = None, crs: Optional[str] = None, nodata: Any = None, scale: float = 1.0,
               resampling: Optional[str] = None, mosaic: bool = False, reference_gsd: Optional[float] = None,
               index_cache: Any = False, bands: Optional[Sequence[int]] = None):
    """The :class:`~dataloaders.geotiff.GeoTiffDataset` of ``source`` with read grids of ``gsd`` metres (None: the
    files' own grid) and windows of ``window`` px; ``sample['res']`` is ``reference_gsd_factor(gsd, reference_gsd)``.
    Raises ``DataError`` (one line) for unreadable input, and when no raster's read grid holds one window (said in
    the launchers' flags: the dataset's own check speaks of a data config's keys)."""
    from dataloaders.errors import DataError
    from dataloaders.geotiff import GeoTiffDataset

    ds = GeoTiffDataset(source, window_size=1, band_files=band_files, scene_glob=scene_glob, glob=glob, crs=crs,
                        nodata=nodata, scale=scale, target_gsd=gsd, resampling=resampling, mosaic=mosaic,
                        reference_gsd=reference_gsd, index_cache=index_cache, bands=bands)
    if not mosaic and not any(h >= window and w >= window for h, w in ds.tile_shapes):
        h, w = max(ds.tile_shapes, key=lambda hw: hw[0] * hw[1])
        where = "" if gsd is None else f" at --gsd {gsd:g}"
        raise DataError(f"--input {source if isinstance(source, str) else ' '.join(map(str, source))}: no raster "
                        f"holds a {window} px window{where} (largest read grid {h}x{w} px); use a smaller "
                        f"--input_size or a finer --gsd (or --mosaic where tiles have neighbours)")
    ds.window_size = int(window)
    return ds


def bound_gdal_cache(mib: int = GDAL_CACHE_MIB) -> Optional[int]:
    """Cap GDAL's raster block cache at ``mib`` MiB for this process unless the environment sets ``GDAL_CACHEMAX``
    (the user's value wins). Returns the cap set, or None when left to the user.

    GDAL reads ``GDAL_CACHEMAX`` from the environment only when its cache is first used; the cap is therefore set
    through ``GDALSetCacheMax`` (``rasterio.env.set_gdal_config``), which takes effect whenever it is called. The inference launchers call it before they read any raster."""
    if os.environ.get("GDAL_CACHEMAX", "").strip():
        return None
    from rasterio.env import set_gdal_config

    set_gdal_config("GDAL_CACHEMAX", int(mib) * 2**20)
    return int(mib)


def native_gsd(ds) -> float:
    """The finest ground GSD (metres) any file of the scene has: the finest ``--gsd`` readable without upsampling."""
    return min(float(info.gsd) for infos in ds.tile_index["infos"] for info in infos)


def axis_starts(length: int, size: int, stride: int, before: bool = False, after: bool = False) -> list[int]:
    """Start offsets of windows of ``size`` every ``stride`` px along an axis of ``length`` px.

    Inside the axis (the default), the last window is moved back to end at ``length`` (``[]`` when
    ``length < size``). ``before`` / ``after``: there is data past that end (a neighbouring tile of a mosaic), so
    the windows continue on the same stride grid (offsets ``k * stride``) past it: every window of that grid that
    meets ``[0, length)`` on that side, i.e. starting from ``-mosaic_margin(size, stride)`` / up to ``length - 1``.
    """
    if size <= 0 or stride <= 0:
        raise ValueError(f"window size and stride must be positive, got {size} and {stride}")
    first = -mosaic_margin(size, stride) if before else 0
    last = length - 1 if after else length - size  # the last start allowed
    if not (before or after) and length < size:
        return []
    starts = list(range(first, last + 1, stride))
    if not after and (not starts or starts[-1] + size < length):
        starts.append(length - size)  # the last window ends at `length` (before it: into the neighbour)
    return starts


def mosaic_margin(size: int, stride: int) -> int:
    """Px a window layout reaches past a tile edge with a neighbour: the largest multiple of ``stride`` below
    ``size``, so that every window of the tile's stride grid that meets the tile is kept (a pixel near the edge is
    blended from the same windows as in the merged mosaic, when the tiles' origins lie on one stride grid)."""
    return (size - 1) // stride * stride


def neighbour_sides(ds, tile: int) -> tuple[bool, bool, bool, bool]:
    """``(top, bottom, left, right)``: whether another tile of the scene ``ds`` (a ``GeoTiffDataset``) covers the
    pixels right past that edge of ``tile``'s read grid (a one-pixel band along the edge, kept half a pixel clear
    of the edge line and of the corners: tiles that only share the edge line or a corner do not count)."""
    from affine import Affine

    from dataloaders.geo_index import crs_to_string, grid_footprint, to_crs

    h, w = ds.tile_shapes[tile]
    transform = Affine(*tuple(ds.tile_index["transform"].iloc[tile])[:6])
    crs, index_crs = str(ds.tile_index["crs"].iloc[tile]), crs_to_string(ds.tile_index.crs)
    sindex = ds.tile_index.sindex
    out = []
    for r0, r1, c0, c1 in ((-1.0, -0.5, 0.5, w - 0.5), (h + 0.5, h + 1.0, 0.5, w - 0.5),
                           (0.5, h - 0.5, -1.0, -0.5), (0.5, h - 0.5, w + 0.5, w + 1.0)):
        band = grid_footprint(transform @ Affine.translation(c0, r0), c1 - c0, r1 - r0)
        hits = {int(i) for i in sindex.query(to_crs(band, crs, index_crs), predicate="intersects")}
        out.append(bool(hits - {tile}))
    return out[0], out[1], out[2], out[3]


def window_grid(tile_shapes: Sequence[tuple[int, int]], size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(tile, row, col)`` of every ``size`` px window of each tile's read grid (``tile_shapes``: ``(h, w)``),
    in tile, row, column order."""
    out = []
    for t, (h, w) in enumerate(tile_shapes):
        cols = axis_starts(w, size, stride)
        for r in axis_starts(h, size, stride):
            out.extend((t, r, c) for c in cols)
    return out


def blocks_of(windows: Sequence[tuple[int, int, int]], gsd_index: int) -> dict[Block, list[tuple[int, int, int]]]:
    """Windows grouped by row of their tile: ``{Block: [(tile, row, col), ...]}`` in grid order."""
    out: dict[Block, list] = {}
    for w in windows:
        out.setdefault(Block(gsd_index, w[0], w[1]), []).append(w)
    return out


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Every ``world``-th item from ``rank``: each item belongs to exactly one rank, and neighbouring rows go to
    different ranks (balanced when tiles differ in size)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return list(items[rank::world])


def runs(items: Sequence[T], rank: int, world: int) -> list[T]:
    """One contiguous run of ``items`` per rank, balanced by count (lengths differ by at most one): consecutive
    items (strips of a tile) stay on one rank, which reuses the windows they share."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    n = len(items)
    return list(items[rank * n // world:(rank + 1) * n // world])


def batches(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive chunks of at most ``n``."""
    for i in range(0, len(items), max(int(n), 1)):
        yield items[i:i + n]


class StoreMismatch(Exception):
    """The block folder holds the blocks of a run with other settings (message: which key differs)."""


class BlockStore:
    """Finished blocks of a run in ``folder``: ``manifest.json`` (the run's settings) plus one ``<key>.npz`` per block.

    Each block file is written atomically (a reader sees the whole file or none); :meth:`done` is therefore a
    plain existence test, and a killed run loses at most the blocks it was computing.
    """

    MANIFEST = "manifest.json"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def open(self, settings: Mapping[str, Any], fresh: bool = False) -> int:
        """Create the folder with ``settings`` or check an existing one against them; returns the number of blocks
        already finished. ``fresh``: drop whatever is there first. Raises :class:`StoreMismatch`."""
        manifest = self.folder / self.MANIFEST
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        wanted = json.loads(json.dumps(settings, sort_keys=True, default=str))
        if manifest.is_file():
            have = json.loads(manifest.read_text(encoding="utf-8"))
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            if diff:
                raise StoreMismatch(f"{self.folder} holds the blocks of a run with other settings ({diff[0]}: "
                                    f"{have.get(diff[0])!r} there, {wanted.get(diff[0])!r} now)")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest, json.dumps(wanted, indent=1, sort_keys=True))
        return len(list(self.folder.glob("*.npz")))

    def path(self, block: Block) -> Path:
        return self.folder / f"{block.key}.npz"

    def done(self, block: Block) -> bool:
        return self.path(block).is_file()

    def save(self, block: Block, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write one block's arrays (atomically)."""
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        return atomic_write(self.path(block), lambda fh: fh.write(buf.getvalue()))

    def load(self, block: Block) -> dict[str, np.ndarray]:
        with np.load(self.path(block), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def open_store(store: BlockStore, settings: Mapping[str, Any], overwrite: bool, total: int, unit: str) -> None:
    """Open a run's :class:`BlockStore` on rank 0 (every rank then meets at a barrier): a store left by a run with
    other ``settings`` is one error line unless ``overwrite`` (then started over, said in one line); finished blocks
    are announced as ``resuming: N of total <unit> already done``."""
    import harness
    from util import dist as dist_util

    if dist_util.get_rank() == 0:
        try:
            already = store.open(settings)
        except StoreMismatch as err:
            if not overwrite:
                raise harness.UserError(f"{err}: remove that folder or pass --overwrite to start over") from None
            print(f"NOTE: {err}: started over (--overwrite)")
            already = store.open(settings, fresh=True)
        if already:
            print(f"resuming: {already} of {total} {unit} already done ({store.folder})")
    dist_util.barrier()
