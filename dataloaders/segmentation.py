"""Segmentation data: GeoTIFF windows with labels rasterised from vector polygons, or plain image/mask pairs.

Config (``config/seg_*.yaml``), one top-level ``data`` mapping::

    data:
      type: geotiff              # geotiff: rasters + a vector file; masks: image/mask file pairs
      img_dir: tiles/            # training rasters (folder, recursive *.tif/*.tiff, or one file); masks: images
      labels: buildings.geojson  # geotiff: any vector file geopandas reads (GeoJSON, GPKG, Shapefile, ...), or a
                                 # folder of them (e.g. SpaceNet's one GeoJSON per tile), concatenated
      mask_dir: masks/           # masks: the label images, matched to images by file stem
      val_img_dir: val_tiles/    # validation rasters / images
      val_labels: null           # geotiff: default = labels;  masks: val_mask_dir
      classes: [building]        # foreground classes; class 0 is background, ids 1..K follow this list
      class_column: null         # geotiff: attribute holding each polygon's class name (null: all polygons = class 1)
      mask_values: null          # masks: raw mask value of [background, class 1, ...] (null: the value is the id)
      all_touched: false         # burn every pixel a polygon touches (default: pixels whose centre is inside)
      ignore_index: 255          # label of nodata / unlabelled pixels (excluded from loss and metrics)
      mean: [...]; std: [...]    # per band, after dividing by scale
      scale: 1.0; bands: null; nodata: null; glob: null; reference_gsd: null
      # geotiff: the GeoTIFF reader's keys, same meaning and checks as in dataloaders.config (README "Rasters"):
      crs: null; target_gsd: null; resampling: null; downsampling: null; mosaic: false; gsd_range: null
      nodata_mode: null; band_files: null; scene_glob: null; index_cache: null
      size: 224                  # window side read from the rasters (px)
      length: 1000               # training windows per epoch

Relative paths resolve against ``--data_root`` or the YAML file's folder, as in ``dataloaders.config``.

Labels. Polygons (Polygon/MultiPolygon, holes respected) are reprojected to each raster's CRS once (cached per CRS)
and burnt per window with ``rasterio.features.rasterize`` on the window's own affine transform
(``tile transform * translation(col, row)``): a pixel is labelled when its centre lies inside a polygon
(``all_touched``: when the polygon touches it). Where polygons overlap, the later feature in the file wins.
Pixels the raster marks invalid (nodata / mask / NaN, see ``dataloaders.geotiff``) get ``ignore_index``.
The window grid is the one the GeoTIFF reader returns: warped with ``crs``/``target_gsd``, coarser (covering more
ground) with ``gsd_range``, crossing tile edges with ``mosaic`` (training windows; filled from every tile they
touch), so labels and pixels always agree. Validation datasets read each tile on its own read grid (no
``gsd_range``: the engine rescales validation windows itself and assembles whole tiles).

Samples are dicts (torchgeo style, with metadata): ``image`` FloatTensor [C, S, S] (normalised; invalid pixels 0),
``mask`` LongTensor [S, S], ``res`` float, ``tile`` int, ``row``/``col``/``height``/``width`` (the window, height
and width clipped to the raster), ``transform`` (6 affine coefficients of the window, or None), ``crs`` (str or
None), ``path``; :func:`seg_collate` batches them (tensors stacked, metadata as lists).

Resolution: ``util.gsd.window_res(window_px, model_input_px, base_resolution) * util.gsd.reference_gsd_factor(gsd,
reference_gsd)``, ``gsd`` being the window's ground GSD as the GeoTIFF reader measures it (formulas, and why this
rule has no ``- 1`` unlike pretraining's crop rule: ``util/gsd.py``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from util.gsd import reference_gsd_factor, window_res

from .config import SCHEMA as GEO_SCHEMA
from .config import ConfigError, check_geo_consistency, check_stat_units, check_value, Field, resolve_path
from .errors import DataError, MissingDataError
from .geo_sampler import DistributedRandomWindowSampler, WindowSpec

PathLike = Union[str, os.PathLike]

__all__ = ["SEG_SCHEMA", "load_seg_config", "VectorLabels", "GeoVectorSource", "MaskPairSource",
           "SegmentationDataset", "grid_windows", "TileShardSampler", "seg_collate", "window_transform",
           "build_seg_datasets"]

SEG_TYPES = ("geotiff", "masks")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

# kind, types, doc (kinds as in dataloaders.config plus "strs" and "bool")
SEG_SCHEMA: Dict[str, Field] = {
    "type": Field("str", SEG_TYPES, "geotiff (rasters + vector labels) or masks (image/mask pairs)"),
    "img_dir": Field("path", SEG_TYPES, "training rasters / images"),
    "labels": Field("path", ("geotiff",), "vector file (or folder of vector files) of labelled polygons"),
    "mask_dir": Field("path", ("masks",), "training masks (same file stems as the images)"),
    "val_img_dir": Field("path", SEG_TYPES, "validation rasters / images"),
    "val_labels": Field("path", ("geotiff",), "validation vector file (default: labels)"),
    "val_mask_dir": Field("path", ("masks",), "validation masks"),
    "classes": Field("strs", SEG_TYPES, "foreground class names; ids 1..K in this order, 0 = background"),
    "class_column": Field("str", ("geotiff",), "attribute with each polygon's class name"),
    "mask_values": Field("ints", ("masks",), "raw mask value of background, class 1, ..."),
    "all_touched": Field("bool", ("geotiff",), "burn all pixels a polygon touches"),
    "ignore_index": Field("int", SEG_TYPES, "label of nodata / unlabelled pixels (default 255)"),
    "mean": Field("floats", SEG_TYPES, "per-band mean (after scale)"),
    "std": Field("floats", SEG_TYPES, "per-band std (after scale)"),
    "scale": Field("float", SEG_TYPES, "raw values are divided by it (default 1)"),
    "bands": Field("ints", SEG_TYPES, "1-based bands to read"),
    "glob": Field("str", SEG_TYPES, "file pattern under img_dir / val_img_dir"),
    "reference_gsd": Field("float", ("geotiff",), "metres; res is multiplied by gsd / reference_gsd"),
    "size": Field("int", SEG_TYPES, "window side (px, default 224)"),
    "length": Field("int", SEG_TYPES, "training windows per epoch (default 1000)"),
}
# The GeoTIFF reader's keys, with the kind, meaning and checks of the GeoTIFF configs (dataloaders.config: one home)
SEG_GEO_KEYS = ("nodata", "nodata_mode", "band_files", "scene_glob", "crs", "target_gsd", "resampling",
                "downsampling", "mosaic", "gsd_range", "index_cache")
SEG_SCHEMA.update({k: Field(GEO_SCHEMA[k].kind, ("geotiff",), GEO_SCHEMA[k].doc) for k in SEG_GEO_KEYS})
SEG_DEFAULTS = {"classes": ["building"], "all_touched": False, "ignore_index": 255, "scale": 1.0, "size": 224,
                "length": 1000}


# ================================================================================================== config
def _check(source: str, key: str, value: Any) -> Any:
    field = SEG_SCHEMA[key]
    where = f"{source}: data.{key}"
    if field.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if field.kind == "strs":
        if isinstance(value, str):
            value = [value]
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{where}: expected a non-empty list of class names, got {value!r}")
        return [str(v) for v in value]
    return check_value(source, key, field, value)


def load_seg_config(path: PathLike, data_root: Optional[PathLike] = None,
                    overrides: Sequence[str] = ()) -> dict:
    """Load, override (``"data.key=value"``, YAML values) and validate a segmentation config.

    Returns ``{"data": {...}}`` with defaults filled in and paths absolute. Raises :class:`ConfigError` naming the
    file and key (unknown key, wrong type, key of the other type, missing required key, inconsistent values).
    """
    import yaml

    path = Path(path)
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: cannot read config ({exc})") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("data"), Mapping):
        raise ConfigError(f"{source}: expected a mapping with a top-level 'data' mapping")
    if set(raw) - {"data"}:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(set(raw) - {'data'})}; only 'data' is allowed")
    data = dict(raw["data"])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r}: expected 'data.key=value'")
        key, text = item.split("=", 1)
        key = key.strip().removeprefix("data.")
        if key not in SEG_SCHEMA:
            raise ConfigError(f"{source}: override {item!r}: unknown key data.{key}; allowed: {', '.join(SEG_SCHEMA)}")
        data[key] = yaml.safe_load(text) if text.strip() else None
    data = {k: v for k, v in data.items() if v is not None}
    for key in data:
        if key not in SEG_SCHEMA:
            raise ConfigError(f"{source}: data.{key}: unknown key; allowed keys: {', '.join(SEG_SCHEMA)}")
    dtype = str(data.get("type", "")).lower()
    if dtype not in SEG_TYPES:
        raise ConfigError(f"{source}: data.type: expected one of {', '.join(SEG_TYPES)}, got {data.get('type')!r}")
    base = Path(data_root) if data_root is not None else path.resolve().parent
    out: Dict[str, Any] = {"type": dtype}
    for key, value in data.items():
        if key == "type":
            continue
        if dtype not in SEG_SCHEMA[key].types:
            raise ConfigError(f"{source}: data.{key}: not valid for type {dtype!r}")
        value = _check(source, key, value)
        is_path = SEG_SCHEMA[key].kind in ("path", "path_or_false") and value is not False
        out[key] = resolve_path(value, base) if is_path else value
    for key, value in SEG_DEFAULTS.items():
        if dtype in SEG_SCHEMA[key].types:
            out.setdefault(key, value)
    required = ["img_dir", "val_img_dir", "mean", "std"] + (["labels"] if dtype == "geotiff" else
                                                             ["mask_dir", "val_mask_dir"])
    for key in required:
        if key not in out:
            raise ConfigError(f"{source}: data.{key}: required for type {dtype!r}")
    if dtype == "geotiff":
        out.setdefault("val_labels", out["labels"])
        check_geo_consistency(source, out)  # band_files, resampling, gsd_range, nodata, crs: as GeoTIFF configs
    if len(out["mean"]) != len(out["std"]) or any(s <= 0 for s in out["std"]):
        raise ConfigError(f"{source}: data.std: expected {len(out['mean'])} positive values (as many as data.mean)")
    check_stat_units(source, out)
    if "bands" in out and len(out["bands"]) != len(out["mean"]):
        raise ConfigError(f"{source}: data.bands: expected {len(out['mean'])} bands (as many as data.mean)")
    if not 0 <= out["ignore_index"] <= 255 or out["ignore_index"] <= len(out["classes"]):
        raise ConfigError(f"{source}: data.ignore_index: expected a value in ({len(out['classes'])}, 255], "
                          f"got {out['ignore_index']}")
    if "mask_values" in out and len(out["mask_values"]) != len(out["classes"]) + 1:
        raise ConfigError(f"{source}: data.mask_values: expected {len(out['classes']) + 1} values (background + "
                          f"{len(out['classes'])} classes), got {len(out['mask_values'])}")
    if len(out["classes"]) > 1 and dtype == "geotiff" and "class_column" not in out:
        raise ConfigError(f"{source}: data.class_column: required with {len(out['classes'])} classes (which "
                          f"attribute names each polygon's class?)")
    for key in ("size", "length"):
        if out[key] < 1:
            raise ConfigError(f"{source}: data.{key}: expected a positive integer, got {out[key]}")
    return {"data": out}


# ================================================================================================== labels
def window_transform(tile_transform: Sequence[float], row: int, col: int):
    """Affine transform of the window whose top-left pixel is (row, col) of a raster with ``tile_transform``."""
    from affine import Affine

    return Affine(*tuple(tile_transform)[:6]) @ Affine.translation(col, row)


VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".kml", ".gml")


def _read_vector_file(path: Path):
    import geopandas as gpd

    try:
        return gpd.read_file(path)
    except Exception as exc:  # pyogrio/fiona raise many types
        raise DataError(f"{path}: cannot read the label file (expected GeoJSON/GPKG/Shapefile/...): "
                        f"{str(exc).splitlines()[0]}") from None


def _read_vectors(path: Path):
    """One vector file, or every vector file under a folder (e.g. SpaceNet's one GeoJSON per tile), concatenated
    in the first non-empty file's CRS (files without features are skipped)."""
    import geopandas as gpd
    import pandas as pd

    if not path.exists():
        raise MissingDataError(f"{path}: label file not found")
    if path.is_file():
        return _read_vector_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VECTOR_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no vector files ({', '.join(VECTOR_SUFFIXES)}) in the label folder")
    frames = [f for f in (_read_vector_file(p) for p in files) if len(f)]
    if not frames:
        return gpd.GeoDataFrame(geometry=[], crs="EPSG:4326")
    for p, f in zip(files, frames):
        if f.crs is None:
            raise DataError(f"{p}: label file has no CRS; expected one (e.g. EPSG:4326)")
    crs = frames[0].crs
    return gpd.GeoDataFrame(pd.concat([f.to_crs(crs) for f in frames], ignore_index=True), crs=crs)


class VectorLabels:
    """Labelled polygons of a vector file, rasterised on any window grid.

    Args:
        path: any vector file geopandas reads, a folder of them (concatenated), or a GeoDataFrame.
        classes: foreground class names; polygon values are ``1 + classes.index(name)``.
        class_column: attribute holding each polygon's class name; None: every polygon is class 1.

    Non-polygon features (points, lines) are dropped with a count in ``dropped``; invalid polygons are repaired
    with ``shapely.make_valid``.
    """

    def __init__(self, path, classes: Sequence[str] = ("building",), class_column: Optional[str] = None) -> None:
        import geopandas as gpd
        import shapely

        self.classes = [str(c) for c in classes]
        if isinstance(path, gpd.GeoDataFrame):
            gdf, self.source = path, "<GeoDataFrame>"
        else:
            self.source = str(path)
            gdf = _read_vectors(Path(path))
        if gdf.crs is None and len(gdf):
            raise DataError(f"{self.source}: label file has no CRS; expected one (e.g. EPSG:4326)")
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
        polygonal = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
        self.dropped = int((~polygonal).sum())
        gdf = gdf[polygonal].copy()
        if not len(gdf):
            values = np.zeros(0, dtype=np.uint8)  # no polygons: the builder says so, naming the file
        elif class_column is None:
            if len(self.classes) != 1:
                raise DataError(f"{self.source}: {len(self.classes)} classes need a class column")
            values = np.ones(len(gdf), dtype=np.uint8)
        else:
            if class_column not in gdf.columns:
                raise DataError(f"{self.source}: no column {class_column!r} (data.class_column); columns: "
                                f"{[c for c in gdf.columns if c != 'geometry']}")
            names = gdf[class_column].astype(str)
            unknown = sorted(set(names) - set(self.classes))
            if unknown:
                raise DataError(f"{self.source}: column {class_column!r} has values {unknown[:5]} not in "
                                f"data.classes {self.classes}; add them to data.classes")
            values = np.array([1 + self.classes.index(n) for n in names], dtype=np.uint8)
        geoms = shapely.make_valid(gdf.geometry.values)
        self.gdf = gpd.GeoDataFrame({"value": values}, geometry=list(geoms), crs=gdf.crs)
        self._by_crs: Dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.gdf)

    def __getstate__(self):  # DataLoader workers rebuild their reprojection cache
        state = self.__dict__.copy()
        state["_by_crs"] = {}
        return state

    def in_crs(self, crs: str):
        """The polygons reprojected to ``crs`` (cached), with their spatial index built."""
        frame = self._by_crs.get(crs)
        if frame is None:
            frame = self.gdf.to_crs(crs) if len(self.gdf) else self.gdf.set_crs(crs, allow_override=True)
            frame.sindex  # noqa: B018 - build the spatial index once
            self._by_crs[crs] = frame
        return frame

    def rasterize(self, transform, shape: Tuple[int, int], crs: str, all_touched: bool = False) -> np.ndarray:
        """uint8 [H, W] class ids (0 = background) of the window with affine ``transform`` and ``shape`` in ``crs``."""
        from rasterio.features import rasterize
        from shapely.geometry import box

        h, w = int(shape[0]), int(shape[1])
        out = np.zeros((h, w), dtype=np.uint8)
        if not len(self.gdf):
            return out
        frame = self.in_crs(crs)
        xs, ys = zip(*(transform @ (c, r) for r, c in ((0, 0), (0, w), (h, 0), (h, w))))
        hits = frame.sindex.query(box(min(xs), min(ys), max(xs), max(ys)), predicate="intersects")
        if len(hits) == 0:
            return out
        hits = np.sort(hits)  # file order: later features win where polygons overlap
        shapes = zip(frame.geometry.values[hits], frame["value"].values[hits])
        return rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, all_touched=all_touched,
                         dtype="uint8")


# ================================================================================================= sources
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
            label = np.full(raw.shape, self.ignore_index, dtype=np.uint8)
            values = self.mask_values or list(range(self.num_classes))
            for cls, value in enumerate(values):
                label[raw == value] = cls
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
                 "geometry": box(0, 0, w, h)} for p, (h, w) in zip(self.paths, self.shapes)]
        return gpd.GeoDataFrame(rows, geometry="geometry")


# ================================================================================================= windows
def grid_windows(shapes: Sequence[Tuple[int, int]], size: int) -> List[WindowSpec]:
    """Windows of side ``size`` covering every tile (row-major, tiles in order); the last row/column of windows is
    shifted back to end at the tile's edge (overlapping its neighbour). Tiles smaller than ``size`` get one window
    at (0, 0) (read clipped, then padded)."""
    out = []
    for t, (h, w) in enumerate(shapes):
        rows = list(range(0, max(h - size, 0) + 1, size))
        cols = list(range(0, max(w - size, 0) + 1, size))
        if h > size and rows[-1] != h - size:
            rows.append(h - size)
        if w > size and cols[-1] != w - size:
            cols.append(w - size)
        out += [WindowSpec(t, r, c, size, size) for r in rows for c in cols]
    return out


class TileShardSampler(Sampler):
    """Evaluation windows sharded by tile: rank r of W gets all windows of tiles r, r + W, ..., in order, so that
    each rank assembles (and writes) whole tiles and every window is seen exactly once over the ranks."""

    def __init__(self, windows: Sequence[WindowSpec], num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = [i for i, w in enumerate(windows) if w.tile % num_replicas == rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SegmentationDataset(Dataset):
    """Normalised windows + labels of a source (:class:`GeoVectorSource` or :class:`MaskPairSource`).

    Indexing: a :class:`WindowSpec` (what :class:`DistributedRandomWindowSampler` yields, training) or an int into
    ``windows`` (evaluation: :func:`grid_windows`). Training (``train=True``) resizes windows to ``input_size``
    (image bilinear, label nearest) and flips them horizontally/vertically at random; with ``crop_scale`` (min, max)
    a random square crop of that fraction of the window side is taken first (scale augmentation: the res follows the
    crop, ``res_of``); evaluation returns windows
    at their native ``size`` (the engine rescales them per evaluation scale).
    """

    def __init__(self, source, mean: Sequence[float], std: Sequence[float], size: int,
                 input_size: Optional[int] = None, train: bool = False, windows: Optional[List[WindowSpec]] = None,
                 ignore_index: int = 255, base_resolution: float = 1.0, reference_gsd: Optional[float] = None,
                 length: Optional[int] = None, seed: int = 0, crop_scale: Tuple[float, float] = (1.0, 1.0)) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        if len(mean) != source.num_bands:
            raise DataError(f"{source.paths[0]}: has {source.num_bands} band(s) but data.mean has {len(mean)} entries")
        self.source = source
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.size = int(size)
        self.input_size = int(input_size or size)
        self.train = bool(train)
        self.windows = windows if windows is not None else grid_windows(source.shapes, self.size)
        self.ignore_index = int(ignore_index)
        self.base_resolution = float(base_resolution)
        self.reference_gsd = reference_gsd
        self.length = int(length) if length else len(self.windows)
        self.seed = int(seed)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.epoch = 0

    def __len__(self) -> int:
        return self.length if self.train else len(self.windows)

    def make_sampler(self, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> DistributedRandomWindowSampler:
        """Training windows: the GeoTIFF window sampler (area-weighted tiles, epoch-seeded, distributed)."""
        return DistributedRandomWindowSampler(self.source.tile_index, self.size, self.length,
                                              num_replicas=num_replicas, rank=rank, seed=seed,
                                              mosaic=self.source.mosaic)

    def res_of(self, gsd: Optional[float], input_px: int, window_px: Optional[int] = None) -> float:
        """Model res of ``window_px`` (default ``size``) window pixels with ground ``gsd`` (metres; None: unknown)
        shown at ``input_px`` pixels: ``window_res(...) * reference_gsd_factor(gsd, reference_gsd)``
        (``util/gsd.py``)."""
        res = window_res(window_px or self.size, input_px, self.base_resolution)
        return res * reference_gsd_factor(gsd, self.reference_gsd)

    def __getitem__(self, idx) -> dict:
        spec = WindowSpec(*idx) if not isinstance(idx, (int, np.integer)) else self.windows[int(idx)]
        tile, row, col, size = int(spec.tile), int(spec.row), int(spec.col), int(spec.height)
        th, tw = self.source.shapes[tile]
        if self.train and self.source.mosaic:  # the window may extend past its tile: read whole from all tiles
            h = w = size
        else:
            h, w = min(size, th - row), min(size, tw - col)
        image, valid, label, meta = self.source.read(tile, row, col, h, w)
        image = np.where(valid[None], (image - self.mean) / self.std, 0.0).astype(np.float32)
        image = np.nan_to_num(image)
        label = np.where(valid, label, self.ignore_index).astype(np.int64)
        if (h, w) != (size, size):  # raster smaller than the window: pad (image 0 = mean, label ignored)
            image = np.pad(image, ((0, 0), (0, size - h), (0, size - w)))
            label = np.pad(label, ((0, size - h), (0, size - w)), constant_values=self.ignore_index)
        img_t, lab_t = torch.from_numpy(image), torch.from_numpy(label)
        shown = size  # window pixels per side that the model sees as its input
        if self.train:
            rng = np.random.default_rng([self.seed, tile, row % 2**31, col % 2**31, self.epoch])  # mosaic: row/col < 0
            side = size
            if self.crop_scale != (1.0, 1.0):  # scale augmentation: a random square crop, res follows its side
                side = max(1, min(size, int(round(size * rng.uniform(*self.crop_scale)))))
                top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                img_t, lab_t = img_t[:, top:top + side, left:left + side], lab_t[top:top + side, left:left + side]
            if self.input_size != side:
                img_t = F.interpolate(img_t[None], size=(self.input_size,) * 2, mode="bilinear",
                                      align_corners=False, antialias=True)[0]
                lab_t = F.interpolate(lab_t[None, None].float(), size=(self.input_size,) * 2,
                                      mode="nearest")[0, 0].long()
            shown = side
            if rng.random() < 0.5:
                img_t, lab_t = img_t.flip(-1), lab_t.flip(-1)
            if rng.random() < 0.5:
                img_t, lab_t = img_t.flip(-2), lab_t.flip(-2)
        return {
            "image": img_t.contiguous(), "mask": lab_t.contiguous(),
            "res": self.res_of(meta["gsd"], self.input_size if self.train else size, shown),
            "tile": tile, "row": row, "col": col, "height": h, "width": w,
            "transform": meta["transform"], "crs": meta["crs"], "path": self.source.paths[tile],
        }


def seg_collate(batch: List[dict]) -> dict:
    """Stack ``image`` [N, C, S, S], ``mask`` [N, S, S] and ``res`` [N]; other entries become lists."""
    out: Dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "res": torch.tensor([float(b["res"]) for b in batch], dtype=torch.float32),
    }
    for key in batch[0]:
        if key not in out:
            out[key] = [b[key] for b in batch]
    return out


# ============================================================================================ start-up checks
def _check_not_empty(labels: VectorLabels, key: str, train: bool) -> None:
    """A label file without polygons: an error for training (every pixel would be background), else a warning."""
    if len(labels):
        return
    what = f" ({labels.dropped} non-polygon feature(s) ignored)" if labels.dropped else ""
    if train:
        raise DataError(f"{labels.source}: {key} holds no polygon features{what}: every training pixel would be "
                        f"background; point {key} at the labelled polygons")
    print(f"WARNING: {labels.source}: {key} holds no polygon features{what}: every validation pixel is background")


def _check_tiles_labelled(src: GeoVectorSource, labels: PathLike, key: str, train: bool) -> None:
    """Rasters that no polygon touches burn zero label pixels: an error when that is every training raster (the
    labels lie elsewhere or in another CRS), else one warning line naming them."""
    empty = src.unlabelled_tiles()
    if not empty:
        return
    n = len(src.paths)
    if train and len(empty) == n:
        raise DataError(f"{labels}: no polygon touches any of the {n} training raster(s) of {key} (every label "
                        f"pixel would be background): do the labels cover these rasters, in the CRS they declare?")
    names = ", ".join(os.path.basename(src.paths[i]) for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
    print(f"WARNING: {labels}: no polygon touches {len(empty)} of the {n} {'training' if train else 'validation'} "
          f"raster(s) of {key}, so their labels are all background: {names}")


def _check_mask_values(src: "MaskPairSource", d: Mapping, classes: Sequence[str], mask_dir: PathLike,
                       train: bool) -> None:
    """Configured classes whose mask value never occurs, and raw values that map to no class: an error when no
    foreground class occurs in the training masks, else one warning line each."""
    values = list(d.get("mask_values") or range(len(classes)))
    key = "data.mask_values" if d.get("mask_values") else "the class ids (no data.mask_values)"
    found = sorted(src.raw_values)
    absent = [f"{classes[i]!r} (value {v})" for i, v in enumerate(values) if v not in src.raw_values]
    unmapped = [v for v in found if v not in values and v != d["ignore_index"]]
    hint = f"values in the masks: {found[:12]}{' ...' if len(found) > 12 else ''}; set data.mask_values"
    if train and all(v not in src.raw_values for v in values[1:]):
        raise DataError(f"{mask_dir}: no foreground class of {key} occurs in the training masks (absent: "
                        f"{', '.join(absent)}; {hint})")
    split = "training" if train else "validation"
    if absent:
        print(f"WARNING: {mask_dir}: {', '.join(absent)} of {key} never occur(s) in the {split} masks ({hint})")
    if unmapped:
        print(f"WARNING: {mask_dir}: mask values {unmapped[:12]} of the {split} masks are no class of {key} and "
              f"become data.ignore_index {d['ignore_index']}")


# ================================================================================================ builders
def build_seg_datasets(cfg: Mapping, input_size: int, base_resolution: float = 1.0, seed: int = 0,
                       crop_scale: Tuple[float, float] = (1.0, 1.0),
                       ) -> Tuple[SegmentationDataset, SegmentationDataset, List[str]]:
    """(train dataset, validation dataset, class names with "background" first) of a loaded config;
    ``crop_scale``: the training windows' random square crop, as a fraction of the window side."""
    from .geotiff import geotiff_dataset_from_config

    d = cfg["data"]
    classes = ["background"] + list(d["classes"])
    common = dict(mean=d["mean"], std=d["std"], size=d["size"], ignore_index=d["ignore_index"],
                  base_resolution=base_resolution, reference_gsd=d.get("reference_gsd"), seed=seed)

    def source(img_dir, label_src, train):
        if d["type"] == "geotiff":
            # the GeoTIFF reader of the pretraining configs, with the same keys; evaluation reads every tile on its
            # own grid (no gsd_range: the engine rescales validation windows itself and assembles whole tiles)
            geo = geotiff_dataset_from_config({**d, "img_dir": img_dir, "length": None,
                                               "gsd_range": d.get("gsd_range") if train else None},
                                              window_size=1, seed=seed)
            return GeoVectorSource(geo, label_src, d["all_touched"])
        return MaskPairSource(img_dir, label_src, len(classes), d["scale"], d.get("bands"), d.get("glob"),
                              d.get("mask_values"), d["ignore_index"])

    if d["type"] == "geotiff":
        train_labels = VectorLabels(d["labels"], d["classes"], d.get("class_column"))
        val_labels = (train_labels if d["val_labels"] == d["labels"]
                      else VectorLabels(d["val_labels"], d["classes"], d.get("class_column")))
        if train_labels.dropped:
            print(f"{d['labels']}: ignoring {train_labels.dropped} non-polygon feature(s)")
        _check_not_empty(train_labels, "data.labels", train=True)
        if val_labels is not train_labels:
            _check_not_empty(val_labels, "data.val_labels", train=False)
        train_src, val_src = source(d["img_dir"], train_labels, True), source(d["val_img_dir"], val_labels, False)
        if len(train_labels):
            _check_tiles_labelled(train_src, d["labels"], "data.img_dir", train=True)
        if len(val_labels):
            _check_tiles_labelled(val_src, d["val_labels"], "data.val_img_dir", train=False)
    else:
        train_src = source(d["img_dir"], d["mask_dir"], True)
        val_src = source(d["val_img_dir"], d["val_mask_dir"], False)
        _check_mask_values(train_src, d, classes, d["mask_dir"], train=True)
        if d["val_mask_dir"] != d["mask_dir"]:
            _check_mask_values(val_src, d, classes, d["val_mask_dir"], train=False)
    if not d.get("mosaic") and not any(h >= d["size"] and w >= d["size"] for h, w in train_src.shapes):
        raise DataError(f"{d['img_dir']}: no training raster/image holds a {d['size']} px window; lower data.size")
    train = SegmentationDataset(train_src, input_size=input_size, train=True, length=d["length"],
                                crop_scale=crop_scale, **common)
    val = SegmentationDataset(val_src, input_size=input_size, train=False, **common)
    return train, val, classes
