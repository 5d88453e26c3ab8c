"""Random windows over a tile index, and the distributed epoch-seeded sampler that yields them.

A window is a :class:`WindowSpec` ``(tile, row, col, height, width)`` in the read grid of tile ``tile`` (a
row of the tile index; see ``geo_index``). Windows lie fully inside their tile, or, with ``mosaic``, have
their centre inside it and may extend over its neighbours; with an area of interest the window's centre
lies inside the tile's drawable region (``region_px``). Tiles are chosen with probability
proportional to the ground area of their drawable region (with replacement), as the original
``DistributedRandomGeoSampler`` did.
"""
from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
from torch.utils.data import Sampler

from .errors import DataError


class WindowSpec(NamedTuple):
    """A pixel window of one tile of the index."""

    tile: int
    row: int
    col: int
    height: int
    width: int


class WindowDrawer:
    """Draws random ``size`` x ``size`` windows from a tile index, deterministically from a numpy Generator.

    Without ``mosaic`` a window lies inside its tile: tiles smaller than the window, or whose drawable region
    cannot hold a window centre, get weight 0; if no tile is left a :class:`DataError` says so. With
    ``mosaic`` the window's centre is uniform over the tile's drawable region and the window may extend past
    the tile (the reader fills it from the neighbouring tiles), so tiles of any size keep their weight and
    the centres are uniform over the union of the tiles.
    """

    def __init__(self, index, size: int, max_tries: int = 64, mosaic: bool = False) -> None:
        import shapely
        from shapely.geometry import box

        self.size = int(size)
        self.max_tries = int(max_tries)
        self.mosaic = bool(mosaic)
        n = len(index)
        self.width = index["width"].to_numpy(dtype=np.int64)
        self.height = index["height"].to_numpy(dtype=np.int64)
        self.regions = list(index["region_px"])
        self.full = np.zeros(n, dtype=bool)
        self.fallback = [None] * n
        weights = index["area_m2"].to_numpy(dtype=np.float64).copy()
        half = self.size / 2.0
        areas = shapely.area(np.asarray(self.regions, dtype=object)) if n else np.zeros(0)
        for t in range(n):
            w, h = self.width[t], self.height[t]
            region = self.regions[t]
            if areas[t] >= w * h * (1 - 1e-9):  # the whole tile (no AOI): no geometry work, any centre is fine
                self.full[t] = True
                if not self.mosaic and (w < self.size or h < self.size):
                    weights[t] = 0.0
                elif self.mosaic:
                    self.fallback[t] = (int(h // 2 - self.size // 2), int(w // 2 - self.size // 2))
                else:
                    self.fallback[t] = (int((h - self.size) // 2), int((w - self.size) // 2))
                continue
            whole = box(0, 0, w, h)
            self.full[t] = region.buffer(1e-6).contains(whole)
            if self.mosaic:
                allowed = region
            else:
                if w < self.size or h < self.size:
                    weights[t] = 0.0
                    continue
                allowed = region.intersection(box(half - 0.5, half - 0.5, w - half + 0.5, h - half + 0.5))
            if allowed.is_empty:
                weights[t] = 0.0
                continue
            shapely.prepare(region)
            pt = allowed.representative_point()
            row, col = int(round(pt.y - half)), int(round(pt.x - half))
            if not self.mosaic:
                row, col = int(np.clip(row, 0, h - self.size)), int(np.clip(col, 0, w - self.size))
            self.fallback[t] = (row, col)
        if weights.sum() <= 0:
            sizes = ", ".join(f"{a}x{b}" for a, b in list(zip(self.width, self.height))[:3])
            raise DataError(f"no tile can hold a {self.size}x{self.size} px window inside its valid region "
                            f"(tile sizes {sizes}{' ...' if n > 3 else ''}); use a smaller data.size, or "
                            f"data.mosaic: true to read windows across neighbouring tiles")
        self.weights = weights / weights.sum()

    def _positions(self, tiles: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        import shapely

        n = tiles.size
        rows = np.zeros(n, dtype=np.int64)
        cols = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        for _ in range(self.max_tries):
            if todo.size == 0:
                break
            u = rng.random((todo.size, 2))
            t = tiles[todo]
            if self.mosaic:  # centre pixel uniform over the tile
                rows[todo] = np.floor(u[:, 0] * self.height[t]).astype(np.int64) - self.size // 2
                cols[todo] = np.floor(u[:, 1] * self.width[t]).astype(np.int64) - self.size // 2
            else:  # window uniform inside the tile
                rows[todo] = np.floor(u[:, 0] * (self.height[t] - self.size + 1)).astype(np.int64)
                cols[todo] = np.floor(u[:, 1] * (self.width[t] - self.size + 1)).astype(np.int64)
            ok = self.full[t].copy()
            for tile in np.unique(t[~ok]):
                sel = np.flatnonzero((t == tile) & ~ok)
                cx = cols[todo[sel]] + self.size / 2.0
                cy = rows[todo[sel]] + self.size / 2.0
                ok[sel] = shapely.intersects_xy(self.regions[tile], cx, cy)
            todo = todo[~ok]
        for i in todo:  # pathological regions: fall back to a fixed valid position
            rows[i], cols[i] = self.fallback[tiles[i]]
        return rows, cols

    def draw(self, n: int, rng: np.random.Generator) -> List[WindowSpec]:
        """``n`` windows: area-weighted tiles, uniform positions (rejected until the centre is in the region)."""
        tiles = rng.choice(len(self.weights), size=n, p=self.weights)
        rows, cols = self._positions(tiles, rng)
        return [WindowSpec(int(t), int(r), int(c), self.size, self.size) for t, r, c in zip(tiles, rows, cols)]

    def draw_in_tile(self, tile: int, rng: np.random.Generator) -> WindowSpec:
        """One window of tile ``tile`` (as :meth:`draw` places them); used to redraw mostly-invalid windows."""
        rows, cols = self._positions(np.array([int(tile)]), rng)
        return WindowSpec(int(tile), int(rows[0]), int(cols[0]), self.size, self.size)


class DistributedRandomWindowSampler(Sampler):
    """Distributed, epoch-seeded, area-weighted random window sampler over a tile index.

    Per epoch a generator seeded with ``(seed, epoch)`` draws ``total = ceil(length / num_replicas) *
    num_replicas`` windows; rank ``r`` yields windows ``r, r + num_replicas, ...`` -- so the ranks' windows
    are disjoint slices of one global sequence, identical for a given (seed, epoch) whatever the rank count
    divides. With ``shuffle=False`` the epoch is ignored (the same windows every epoch).

    Args:
        index: the tile index (GeoDataFrame from :func:`build_tile_index`) or an object with a
            ``tile_index`` attribute (e.g. a :class:`GeoTiffDataset`).
        size: window side in pixels.
        length: windows per epoch over all ranks.
        num_replicas, rank: distributed world size and this process's rank.
        seed: base seed (same on every rank).
        shuffle: draw new windows every epoch.
        mosaic: windows may extend past their tile (see :class:`WindowDrawer`); tile weights stay the
            tiles' ground areas.
    """

    def __init__(self, index, size: int, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, mosaic: bool = False) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        import pandas as pd

        if not isinstance(index, pd.DataFrame):
            index = index.tile_index
        self.drawer = WindowDrawer(index, size, mosaic=mosaic)
        self.size = int(size)
        self.length = int(length)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.num_samples = math.ceil(self.length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Use the windows of ``epoch`` on the next iteration (call before every epoch, on every rank)."""
        self.epoch = int(epoch)

    def windows(self, epoch: Optional[int] = None) -> List[WindowSpec]:
        """All ``total_size`` windows of an epoch (every rank's), in global order."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch if self.shuffle else 0])
        return self.drawer.draw(self.total_size, rng)

    def __iter__(self) -> Iterator[WindowSpec]:
        return iter(self.windows()[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
