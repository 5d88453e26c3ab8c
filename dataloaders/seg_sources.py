"""Segmentation sources: where a window's pixels and labels come from.

* :class:`GeoVectorSource`: rasters read by the GeoTIFF reader (``dataloaders.geotiff``) + :class:`VectorLabels`
  burnt on the window grid the reader returns (warped with ``crs``/``target_gsd``, coarser with ``gsd_range``,
  crossing tile edges with ``mosaic``), so labels and pixels always agree. Pixels the raster marks invalid
  (nodata / mask / NaN) come back as invalid.
* :class:`MaskPairSource`: image/mask file pairs (PNG, JPEG or TIFF) matched by file stem, read whole and cached.

Both expose ``paths``, ``shapes`` [(H, W)], ``transforms``, ``crs``, ``num_bands``, ``mosaic``, ``tile_index`` and
``read(tile, row, col, h, w) -> (image float32 [C, h, w], valid bool [h, w], label uint8 [h, w], meta)`` with
``meta = {"transform", "crs", "gsd"}`` (``gsd``: the window's ground GSD in metres, or None).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import DataError, MissingDataError
from .geo_sampler import WindowSpec
from .seg_labels import VectorLabels, mask_to_classes

PathLike = Union[str, os.PathLike]

__all__ = ["IMAGE_SUFFIXES", "GeoVectorSource", "MaskPairSource", "window_transform"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def window_transform(tile_transform: Sequence[float], row: int, col: int):
    """Affine transform of the window whose top-left pixel is (row, col) of a raster with ``tile_transform``."""
    from affine import Affine

    return Affine(*tuple(tile_transform)[:6]) @ Affine.translation(col, row)


class GeoVectorSource:
    """Rasters (a :class:`~dataloaders.geotiff.GeoTiffDataset`) + :class:`VectorLabels`.

    ``read(tile, row, col, h, w)`` returns ``(image float32 [C, h, w] (divided by scale), valid bool [h, w], label
    uint8 [h, w], meta)``; the labels are burnt on the window grid the GeoTIFF reader reports (``meta``: its
    ``transform``, ``crs`` and ground ``gsd`` in metres).
    """

    def __init__(self, geo, labels: VectorLabels, all_touched: bool = False) -> None:
        self.geo = geo
        self.labels = labels
        self.all_touched = bool(all_touched)
        index = geo.tile_index
        self.tile_index = index
        self.paths = [str(p) for p in index["path"]]
        self.shapes = [(int(h), int(w)) for h, w in zip(index["height"], index["width"])]
        self.transforms = [tuple(t) for t in index["transform"]]
        self.crs = [str(c) for c in index["crs"]]
        self.num_bands = geo.num_bands
        self.mosaic = bool(geo.mosaic)  # windows may cross tile edges (filled from every tile they touch)

    def unlabelled_tiles(self) -> List[int]:
        """Indexes of the rasters that no labelled polygon touches (their footprint, in their own CRS, intersects
        no polygon): every label pixel of such a tile is background."""
        from affine import Affine
        from shapely.geometry import Polygon

        if not len(self.labels):
            return list(range(len(self.paths)))
        found: set = set()
        by_crs: Dict[str, List[int]] = {}
        for i, crs in enumerate(self.crs):
            by_crs.setdefault(crs, []).append(i)
        for crs, tiles in by_crs.items():
            footprints = []
            for i in tiles:
                a, (h, w) = Affine(*self.transforms[i][:6]), self.shapes[i]
                footprints.append(Polygon([a @ (0, 0), a @ (w, 0), a @ (w, h), a @ (0, h)]))
            hit_rows = self.labels.in_crs(crs).sindex.query(footprints, predicate="intersects")[0]
            found.update(tiles[j] for j in set(int(r) for r in hit_rows))
        return [i for i in range(len(self.paths)) if i not in found]

    def read(self, tile: int, row: int, col: int, h: int, w: int):
        from affine import Affine

        # the reader's grid: the tile's own, warped to data.crs / target_gsd, or decimated (gsd_range); the labels
        # are burnt on exactly that grid, so they stay on their pixels whatever the read did
        sample = self.geo.read_window(WindowSpec(tile, row, col, h, w))
        label = self.labels.rasterize(Affine(*sample["transform"]), (h, w), sample["crs"], self.all_touched)
        meta = {"transform": tuple(sample["transform"])[:6], "crs": sample["crs"], "gsd": float(sample["gsd"])}
        return sample["image"].numpy(), sample["mask"].numpy(), label, meta


def _pair_files(img_dir: PathLike, mask_dir: PathLike, glob: Optional[str]) -> List[Tuple[str, str]]:
    img_dir, mask_dir = Path(img_dir), Path(mask_dir)
    for folder, what in ((img_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise MissingDataError(f"{folder}: {what} folder not found")
    images = sorted(p for p in (img_dir.glob(glob) if glob else img_dir.rglob("*"))
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    masks = {p.stem: p for p in mask_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise DataError(f"{mask_dir}: no mask for image(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                        f"(masks are matched to images by file stem)")
    return [(str(p), str(masks[p.stem])) for p in images]


def _read_array(path: str, bands: Optional[Sequence[int]] = None):
    """(array [C, H, W], transform or None, crs or None) of a PNG/JPEG (Pillow) or TIFF (rasterio)."""
    try:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            import warnings

            import rasterio
            from rasterio.errors import NotGeoreferencedWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    arr = src.read(indexes=list(bands) if bands else None)
                    geo = not src.transform.is_identity and src.crs is not None
                    return arr, (tuple(src.transform)[:6] if geo else None), (src.crs.to_string() if geo else None)
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if bands:
            arr = arr[[b - 1 for b in bands]]
        return arr, None, None
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None
    except Exception as exc:  # rasterio errors
        raise DataError(f"{path}: cannot read the image ({str(exc).splitlines()[0]})") from None


class MaskPairSource:
    """Image/mask file pairs (PNG, JPEG or TIFF; matched by file stem). Images are read whole and cached.

    ``mask_values``: raw mask value of background, class 1, ...; other values become ``ignore_index``. Without it
    the raw value is the class id (values > number of classes become ``ignore_index``).
    """

    def __init__(self, img_dir: PathLike, mask_dir: PathLike, num_classes: int, scale: float = 1.0,
                 bands: Optional[Sequence[int]] = None, glob: Optional[str] = None,
                 mask_values: Optional[Sequence[int]] = None, ignore_index: int = 255) -> None:
        self.pairs = _pair_files(img_dir, mask_dir, glob)
        self.paths = [p for p, _ in self.pairs]
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.bands = list(bands) if bands else None
        self.mask_values = list(mask_values) if mask_values else None
        self.ignore_index = int(ignore_index)
        self.mosaic = False
        self.shapes, self.transforms, self.crs = [], [], []
        self.dtypes: List[str] = []  # each image's pixel dtype as read (dataloaders.pixel_dtype)
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        counts = set()
        self.raw_values: set = set()  # every raw value of the masks (start-up checks of data.mask_values)
        for img_path, mask_path in self.pairs:
            img, transform, crs = _read_array(img_path, self.bands)
            mask = _read_array(mask_path)[0]
            self.raw_values.update(int(v) for v in np.unique(mask[0]))
            if img.shape[1:] != mask.shape[1:]:
                raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[2]} px but its image {img_path} "
                                f"is {img.shape[1]}x{img.shape[2]} px")
            counts.add(img.shape[0])
            self.shapes.append((int(img.shape[1]), int(img.shape[2])))
            self.transforms.append(transform)
            self.crs.append(crs)
            self.dtypes.append(str(img.dtype))
        if len(counts) > 1:
            raise DataError(f"{img_dir}: images have different band counts {sorted(counts)}; set data.bands")
        self.num_bands = counts.pop()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def _load(self, tile: int) -> Tuple[np.ndarray, np.ndarray]:
        if tile not in self._cache:
            if len(self._cache) >= 32:
                self._cache.clear()
            img_path, mask_path = self.pairs[tile]
            img = _read_array(img_path, self.bands)[0].astype(np.float32) / self.scale
            raw = _read_array(mask_path)[0][0].astype(np.int64)
            label = mask_to_classes(raw, self.mask_values, self.num_classes, self.ignore_index)
            self._cache[tile] = (img, label)
        return self._cache[tile]

    def read(self, tile: int, row: int, col: int, h: int, w: int):
        img, label = self._load(tile)
        img = img[:, row:row + h, col:col + w]
        valid = ~np.any(np.isnan(img), axis=0)
        transform = self.transforms[tile]
        meta = {"transform": None if transform is None else tuple(window_transform(transform, row, col))[:6],
                "crs": self.crs[tile], "gsd": None}
        return img, valid, label[row:row + h, col:col + w].copy(), meta

    @property
    def tile_index(self):
        """A tile index (pixel areas) so that :class:`DistributedRandomWindowSampler` draws windows here too."""
        import geopandas as gpd
        from shapely.geometry import box

        rows = [{"path": p, "width": w, "height": h, "region_px": box(0, 0, w, h), "area_m2": float(w * h),
                 "dtype": dtype, "geometry": box(0, 0, w, h)}
                for p, (h, w), dtype in zip(self.paths, self.shapes, self.dtypes)]
        return gpd.GeoDataFrame(rows, geometry="geometry")
