"""YAML data configs (datasets and segmentation): loading, validation, path resolution, CLI overrides, saving.

Two schemas share one parser, one set of checks and one wording of errors (``<file>: data.<key>: ...``):
``schema="dataset"`` (:data:`SCHEMA`: pretraining, linear probe) and ``schema="segmentation"`` (:data:`SEG_SCHEMA`:
``main_segment.py``), chosen by the caller of :func:`load_config` / :func:`validate_config`.

Dataset configs. A config file has one top-level key, ``data``, in the schema of the original Scale-MAE configs
(``type, img_dir, mean, std, oversample, vis_factor, length, size, base_resolution, input_size``) plus the
keys of the GeoTIFF datasets (``bands, nodata, aoi, reference_gsd, scale, glob, min_valid, band_files,
scene_glob, crs, target_gsd, resampling, downsampling, mosaic, gsd_range, nodata_mode, index_cache``) and of the
built-in demo data (``num_classes, seed``). See ``config/*.yaml`` for commented examples.

Rules
* ``type`` is case-insensitive and returned lower-case: ``fmow``, ``resisc``, ``eurosat``, ``naip``,
  ``sentinel2``, ``geotiff``, ``demo``.
* Unknown keys, keys that do not apply to the type, wrong types and inconsistent values raise
  :class:`ConfigError` naming the file and the key. ``null`` means "not set".
* Relative paths (``img_dir``, ``aoi``) resolve against ``data_root`` when given, otherwise against the
  folder that holds the YAML file -- never against the current working directory. ``~`` and ``$VARS`` are
  expanded first.
* Overrides are ``"data.key=value"`` strings (``"key=value"`` is accepted too); the value is parsed as YAML,
  so ``data.mean=[0.5,0.5,0.5]`` and ``data.length=100`` work. They are applied before validation.

Segmentation configs (``config/seg_*.yaml``), one top-level ``data`` mapping::

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
      # geotiff: the GeoTIFF reader's keys, same kind, meaning and checks as in dataset configs:
      crs: null; target_gsd: null; resampling: null; downsampling: null; mosaic: false; gsd_range: null
      nodata_mode: null; band_files: null; scene_glob: null; index_cache: null
      size: 224                  # window side read from the rasters (px)
      length: 1000               # training windows per epoch

The same rules hold (case-insensitive ``type``, ``null`` = not set, paths, overrides); what the keys do with the
data: ``dataloaders.segmentation`` (windows, builder), ``dataloaders.seg_labels``, ``dataloaders.seg_sources``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import yaml

from .geo_read import NODATA_MODES, RESAMPLING_METHODS
from .stats import DEMO_MEAN, DEMO_STD

PathLike = Union[str, os.PathLike]

FOLDER_TYPES = ("fmow", "resisc", "eurosat")
GEO_TYPES = ("naip", "sentinel2", "geotiff")
DEMO_TYPES = ("demo",)
ALL_TYPES = FOLDER_TYPES + GEO_TYPES + DEMO_TYPES


class ConfigError(ValueError):
    """Invalid dataset config; the message names the file and the key."""


@dataclass(frozen=True)
class Field:
    kind: str  # "str", "strs", "names", "path", "path_or_false", "bool", "int", "float", "floats", "float_or_floats",
    #            "ints"
    types: tuple = ALL_TYPES  # dataset types the key applies to
    doc: str = ""


SCHEMA: dict[str, Field] = {
    "type": Field("str", doc="dataset type: " + ", ".join(ALL_TYPES)),
    "img_dir": Field("path", FOLDER_TYPES + GEO_TYPES,
                      "ImageFolder root, split-list file, or folder/file of GeoTIFFs"),
    "mean": Field("floats", doc="per-channel mean, in the scale of the input tensor"),
    "std": Field("floats", doc="per-channel std, same scale as mean"),
    "oversample": Field("float", doc="DataLoader batch multiplier (default 1.0)"),
    "vis_factor": Field("float", doc="visualisation divisor (default 1.0)"),
    "length": Field("int", GEO_TYPES + DEMO_TYPES, "samples per epoch (GeoTIFF) / images (demo)"),
    "size": Field("int", GEO_TYPES + DEMO_TYPES, "window side read from rasters / demo image side (px)"),
    "base_resolution": Field("float", doc="informational, as in the original (CLI --base_resolution is used)"),
    "input_size": Field("int", doc="informational, as in the original (CLI --input_size is used)"),
    "bands": Field("ints", GEO_TYPES, "1-based band indexes to read (GDAL order)"),
    "nodata": Field("float_or_floats", GEO_TYPES, "nodata overriding the files' own: one value or one per band"),
    "aoi": Field("path", GEO_TYPES, "area-of-interest polygon file (GeoJSON/GPKG/...)"),
    "reference_gsd": Field("float", GEO_TYPES, "metres; res follows the window GSD against it (util/gsd.py)"),
    "scale": Field("float", GEO_TYPES, "raw DN divisor applied before mean/std (default 1.0)"),
    "glob": Field("str", GEO_TYPES, "file pattern under img_dir (default: *.tif/*.tiff, recursive)"),
    "min_valid": Field("float", GEO_TYPES, "minimum valid-pixel fraction of a window (default 0.0)"),
    "band_files": Field("strs", GEO_TYPES, "per-band file patterns of a scene folder, stacked in order"),
    "scene_glob": Field("str", GEO_TYPES, "scene folders under img_dir for band_files (default: img_dir)"),
    "crs": Field("str", GEO_TYPES, "read every tile in this CRS (mixed-CRS collections), e.g. EPSG:32633"),
    "target_gsd": Field("float", GEO_TYPES, "metres; cell of the read grid (resampled)"),
    "resampling": Field("str", GEO_TYPES, "warp resampling method (default bilinear)"),
    "downsampling": Field("str", GEO_TYPES, "gsd_range read method (default average)"),
    "mosaic": Field("bool", GEO_TYPES, "windows may cross tile edges (read from all tiles they touch)"),
    "gsd_range": Field("floats", GEO_TYPES, "[min, max] metres: read each window at a GSD drawn from it"),
    "nodata_mode": Field("str", GEO_TYPES, "any (default): a pixel is invalid when any band is; all"),
    "index_cache": Field("path_or_false", GEO_TYPES, "tile-header cache file, or false (default: automatic)"),
    "num_classes": Field("int", DEMO_TYPES, "demo: number of synthetic scene classes"),
    "seed": Field("int", DEMO_TYPES, "demo: generator seed"),
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {"oversample": 1.0, "vis_factor": 1.0},
    "naip": {"scale": 1.0, "min_valid": 0.0},
    "sentinel2": {"scale": 1.0, "min_valid": 0.0},
    "geotiff": {"scale": 1.0, "min_valid": 0.0},
    "demo": {"length": 256, "size": 96, "num_classes": 4, "seed": 0, "mean": list(DEMO_MEAN), "std": list(DEMO_STD)},
}

SEG_TYPES = ("geotiff", "masks")

SEG_SCHEMA: dict[str, Field] = {
    "type": Field("str", SEG_TYPES, "geotiff (rasters + vector labels) or masks (image/mask pairs)"),
    "img_dir": Field("path", SEG_TYPES, "training rasters / images"),
    "labels": Field("path", ("geotiff",), "vector file (or folder of vector files) of labelled polygons"),
    "mask_dir": Field("path", ("masks",), "training masks (same file stems as the images)"),
    "val_img_dir": Field("path", SEG_TYPES, "validation rasters / images"),
    "val_labels": Field("path", ("geotiff",), "validation vector file (default: labels)"),
    "val_mask_dir": Field("path", ("masks",), "validation masks"),
    "classes": Field("names", SEG_TYPES, "foreground class names; ids 1..K in this order, 0 = background"),
    "class_column": Field("str", ("geotiff",), "attribute with each polygon's class name"),
    "mask_values": Field("ints", ("masks",), "raw mask value of background, class 1, ..."),
    "all_touched": Field("bool", ("geotiff",), "burn all pixels a polygon touches"),
    "ignore_index": Field("int", SEG_TYPES, "label of nodata / unlabelled pixels (default 255)"),
    "mean": Field("floats", SEG_TYPES, "per-band mean (after scale)"),
    "std": Field("floats", SEG_TYPES, "per-band std (after scale)"),
    "scale": Field("float", SEG_TYPES, "raw values are divided by it (default 1)"),
    "bands": Field("ints", SEG_TYPES, "1-based bands to read"),
    "glob": Field("str", SEG_TYPES, "file pattern under img_dir / val_img_dir"),
    "reference_gsd": Field("float", ("geotiff",), SCHEMA["reference_gsd"].doc),
    "size": Field("int", SEG_TYPES, "window side (px, default 224)"),
    "length": Field("int", SEG_TYPES, "training windows per epoch (default 1000)"),
}
# the GeoTIFF reader's keys: kind, meaning and checks of the dataset configs (one home: SCHEMA)
SEG_SCHEMA.update({k: Field(SCHEMA[k].kind, ("geotiff",), SCHEMA[k].doc)
                   for k in ("nodata", "nodata_mode", "band_files", "scene_glob", "crs", "target_gsd", "resampling",
                             "downsampling", "mosaic", "gsd_range", "index_cache")})

SEG_DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {"classes": ["building"], "ignore_index": 255, "scale": 1.0, "size": 224, "length": 1000},
    "geotiff": {"all_touched": False},
}


def _where(source: str, key: str) -> str:
    return f"{source}: data.{key}"


def check_value(source: str, key: str, field: Field, value: Any) -> Any:
    """Return ``value`` converted to the field's kind or raise ConfigError (expected vs got)."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{_where(source, key)}: expected {expected}, got {value!r} "
                           f"({type(value).__name__})")

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    kind = field.kind
    if kind == "path_or_false":
        if value is False:
            return False
        kind = "path"
    if kind == "float_or_floats":  # one number, or a list of numbers where null keeps the files' own value
        if isinstance(value, (list, tuple)):
            if not value or not all(v is None or is_num(v) for v in value):
                raise fail("a number or a non-empty list of numbers/nulls")
            return [None if v is None else float(v) for v in value]
        kind = "float"
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if kind == "names":  # one name or a list of names (numbers are names too: classes [1, 2])
        items = [value] if isinstance(value, str) else value
        if (not isinstance(items, (list, tuple)) or not items
                or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items)):
            raise fail("a non-empty list of class names")
        return [str(v) for v in items]
    if kind == "strs":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise fail("a non-empty list of strings")
        return [str(v) for v in value]
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value.strip():
            raise fail("a non-empty string" if kind == "str" else "a path (string)")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if kind == "float":
        if not is_num(value):
            raise fail("a number")
        return float(value)
    if kind == "floats":
        if not isinstance(value, (list, tuple)) or not value or not all(is_num(v) for v in value):
            raise fail("a non-empty list of numbers")
        return [float(v) for v in value]
    if kind == "ints":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise fail("a non-empty list of integers")
        return [int(v) for v in value]
    raise AssertionError(kind)


def resolve_path(value: str, base: Path) -> str:
    expanded = os.path.expandvars(os.path.expanduser(value))
    p = Path(expanded)
    if not p.is_absolute():
        p = base / p
    return str(p.resolve(strict=False))


def validate_config(raw: Any, source: str = "<config>", base_dir: Optional[PathLike] = None,
                    schema: str = "dataset") -> dict:
    """Validate a parsed config mapping and return a new, normalised ``{"data": {...}}`` dict.

    Args:
        raw: the parsed YAML (must be a mapping with a ``data`` mapping).
        source: name used in error messages (normally the YAML file path).
        base_dir: folder that relative paths resolve against; ``None`` leaves them untouched.
        schema: ``"dataset"`` (:data:`SCHEMA`) or ``"segmentation"`` (:data:`SEG_SCHEMA`).

    Raises:
        ConfigError: unknown or inapplicable key, wrong type, missing required key, inconsistent values.
    """
    spec = _schema(schema)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a top-level 'data' key, got {type(raw).__name__}")
    extra = sorted(set(raw) - {"data"})
    if extra:
        raise ConfigError(f"{source}: unknown top-level key(s) {extra}; only 'data' is allowed")
    if "data" not in raw or not isinstance(raw["data"], Mapping):
        raise ConfigError(f"{source}: missing 'data' mapping")
    data_in = {k: v for k, v in raw["data"].items() if v is not None}

    for key in data_in:
        if key not in spec.fields:
            raise ConfigError(f"{_where(source, key)}: unknown key; allowed keys: {', '.join(spec.fields)}")
    if "type" not in data_in:
        raise ConfigError(f"{_where(source, 'type')}: required key missing (one of {', '.join(spec.types)})")
    dtype = check_value(source, "type", spec.fields["type"], data_in["type"]).lower()
    if dtype not in spec.types:
        raise ConfigError(f"{_where(source, 'type')}: expected one of {', '.join(spec.types)} "
                          f"(case-insensitive), got {data_in['type']!r}")

    out: dict[str, Any] = {"type": dtype}
    for key, value in data_in.items():
        if key == "type":
            continue
        field = spec.fields[key]
        if dtype not in field.types:
            raise ConfigError(f"{_where(source, key)}: not valid for type {dtype!r} "
                              f"(only for {', '.join(field.types)})")
        value = check_value(source, key, field, value)
        if field.kind in ("path", "path_or_false") and value is not False and base_dir is not None:
            value = resolve_path(value, Path(base_dir))
        out[key] = value

    for key, value in {**spec.defaults.get("*", {}), **spec.defaults.get(dtype, {})}.items():
        out.setdefault(key, value)

    spec.check(source, out)
    return {"data": out}


def _require(source: str, d: dict, keys: Iterable[str]) -> None:
    for key in keys:
        if key not in d:
            raise ConfigError(f"{_where(source, key)}: required for type {d['type']!r}")


def _check_dataset(source: str, d: dict) -> None:
    """The dataset schema's required keys, then the shared checks."""
    _require(source, d, () if d["type"] == "demo" else ("img_dir", "mean", "std"))
    _check_common(source, d)


def _check_segmentation(source: str, d: dict) -> None:
    """The segmentation schema's required keys (filling ``val_labels`` with ``labels`` when unset), the shared
    checks, then the label keys (``ignore_index`` above every class id, ``mask_values`` per class, a
    ``class_column`` for several classes of polygons)."""
    geotiff = d["type"] == "geotiff"
    _require(source, d, ("img_dir", "val_img_dir", "mean", "std")
             + (("labels",) if geotiff else ("mask_dir", "val_mask_dir")))
    if geotiff:
        d.setdefault("val_labels", d["labels"])
    _check_common(source, d)
    n = len(d["classes"])
    if not 0 <= d["ignore_index"] <= 255 or d["ignore_index"] <= n:
        raise ConfigError(f"{_where(source, 'ignore_index')}: expected a value in ({n}, 255], "
                          f"got {d['ignore_index']}")
    if "mask_values" in d and len(d["mask_values"]) != n + 1:
        raise ConfigError(f"{_where(source, 'mask_values')}: expected {n + 1} values (background + {n} classes), "
                          f"got {len(d['mask_values'])}")
    if n > 1 and geotiff and "class_column" not in d:
        raise ConfigError(f"{_where(source, 'class_column')}: required with {n} classes (which attribute names "
                          f"each polygon's class?)")


def _check_common(source: str, d: dict) -> None:
    """The checks every schema shares, on the keys present: statistics (lengths, positive std, units), bands,
    positive sizes and numbers, ``min_valid``, then :func:`check_geo_consistency`."""
    dtype = d["type"]
    if "mean" in d and "std" in d and len(d["mean"]) != len(d["std"]):
        raise ConfigError(f"{_where(source, 'std')}: expected {len(d['mean'])} values (as many as data.mean), "
                          f"got {len(d['std'])}")
    if "std" in d and any(s <= 0 for s in d["std"]):
        raise ConfigError(f"{_where(source, 'std')}: expected positive values, got {d['std']}")
    if dtype in FOLDER_TYPES and "mean" in d and len(d["mean"]) != 3:
        raise ConfigError(f"{_where(source, 'mean')}: expected 3 values (RGB images) for type {dtype!r}, "
                          f"got {len(d['mean'])}")
    check_stat_units(source, d)
    if "bands" in d:
        if any(b < 1 for b in d["bands"]):
            raise ConfigError(f"{_where(source, 'bands')}: expected 1-based band indexes (>= 1), got {d['bands']}")
        if "mean" in d and len(d["bands"]) != len(d["mean"]):
            raise ConfigError(f"{_where(source, 'bands')}: expected {len(d['mean'])} bands (as many as "
                              f"data.mean), got {len(d['bands'])}")
    for key in ("length", "size", "num_classes", "input_size"):
        if key in d and d[key] < 1:
            raise ConfigError(f"{_where(source, key)}: expected a positive integer, got {d[key]}")
    for key in ("oversample", "vis_factor", "scale", "reference_gsd", "base_resolution"):
        if key in d and d[key] <= 0:
            raise ConfigError(f"{_where(source, key)}: expected a positive number, got {d[key]}")
    if "min_valid" in d and not 0.0 <= d["min_valid"] <= 1.0:
        raise ConfigError(f"{_where(source, 'min_valid')}: expected a fraction in [0, 1], got {d['min_valid']}")
    check_geo_consistency(source, d)


@dataclass(frozen=True)
class Schema:
    """One config schema: its keys, its types, defaults (``"*"``: every type) and its check of the whole mapping."""

    fields: Mapping[str, Field]
    types: tuple
    defaults: Mapping[str, Mapping[str, Any]]
    check: Callable[[str, dict], None]


SCHEMAS: dict[str, Schema] = {
    "dataset": Schema(SCHEMA, ALL_TYPES, DEFAULTS, _check_dataset),
    "segmentation": Schema(SEG_SCHEMA, SEG_TYPES, SEG_DEFAULTS, _check_segmentation),
}


def _schema(name: str) -> Schema:
    if name not in SCHEMAS:
        raise ValueError(f"schema must be one of {', '.join(SCHEMAS)}, got {name!r}")
    return SCHEMAS[name]


def check_stat_units(source: str, d: dict) -> None:
    """mean/std in 0-255 units for inputs scaled to 0-1 (image folders and the demo: 8-bit images divided by 255;
    GeoTIFFs with ``scale`` > 1, e.g. 255 or 10000): the normalised inputs would all be about -2 (a constant)."""
    scale = float(d.get("scale") or 1.0)
    if scale > 1.0:
        why = f"data.scale {scale:g} divides the pixel values"
    elif d["type"] in FOLDER_TYPES + DEMO_TYPES:
        why = f"type {d['type']!r} images are read as 0-1"
    else:
        return  # raw DNs (scale 1): any range is possible
    for key, limit in (("mean", 1.5), ("std", 1.0)):
        values = d.get(key) or []
        if any(abs(v) > limit for v in values):
            raise ConfigError(f"{_where(source, key)}: {values} look like 0-255 units, but {why}; give them in "
                              f"0-1 units (divide by 255)")


def check_geo_consistency(source: str, d: dict) -> None:
    """Checks of the GeoTIFF keys (band files, reprojection, multi-GSD reads, nodata)."""
    if "band_files" in d:
        for key, hint in (("bands", "the band_files patterns select and order the bands"),
                          ("glob", "band_files patterns are globbed inside each scene folder (see scene_glob)")):
            if key in d:
                raise ConfigError(f"{_where(source, key)}: not valid together with data.band_files ({hint})")
    elif "scene_glob" in d:
        raise ConfigError(f"{_where(source, 'scene_glob')}: only used with data.band_files")
    for key in ("resampling", "downsampling"):
        if key in d and d[key] not in RESAMPLING_METHODS:
            raise ConfigError(f"{_where(source, key)}: expected one of {', '.join(RESAMPLING_METHODS)}, got {d[key]!r}")
    if "nodata_mode" in d and d["nodata_mode"] not in NODATA_MODES:
        raise ConfigError(f"{_where(source, 'nodata_mode')}: expected one of {', '.join(NODATA_MODES)}, "
                          f"got {d['nodata_mode']!r}")
    if "target_gsd" in d and d["target_gsd"] <= 0:
        raise ConfigError(f"{_where(source, 'target_gsd')}: expected a positive number of metres, "
                          f"got {d['target_gsd']}")
    if "gsd_range" in d:
        g = d["gsd_range"]
        if len(g) != 2 or not 0 < g[0] <= g[1]:
            raise ConfigError(f"{_where(source, 'gsd_range')}: expected [min, max] metres with 0 < min <= max, "
                              f"got {g}")
    if isinstance(d.get("nodata"), list):
        n = len(d["bands"]) if "bands" in d else len(d.get("mean", []))
        if n and len(d["nodata"]) != n:
            raise ConfigError(f"{_where(source, 'nodata')}: expected one value or {n} (one per band read), "
                              f"got {len(d['nodata'])}")
    if "crs" in d:
        try:
            from pyproj import CRS
            from pyproj.exceptions import CRSError

            CRS.from_user_input(d["crs"])
        except CRSError as exc:
            raise ConfigError(f"{_where(source, 'crs')}: not a CRS pyproj understands ({d['crs']!r}: {exc}); "
                              f"expected e.g. EPSG:32633") from None


def apply_overrides(raw: Any, overrides: Iterable[str], source: str = "<config>", schema: str = "dataset") -> Any:
    """Apply ``"data.key=value"`` strings (YAML-parsed values) to a parsed config; returns a new mapping."""
    fields = _schema(schema).fields
    if not isinstance(raw, Mapping) or not isinstance(raw.get("data"), Mapping):
        return raw  # validate_config reports the structural problem
    data = dict(raw["data"])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r}: expected 'data.key=value'")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("data."):
            key = key[len("data."):]
        if key not in fields:
            raise ConfigError(f"{source}: override {item!r}: unknown key data.{key}; allowed keys: "
                              f"{', '.join(fields)}")
        try:
            data[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: override {item!r}: value is not valid YAML ({exc})") from None
    return {**raw, "data": data}


def load_config(path: PathLike, data_root: Optional[PathLike] = None,
                overrides: Optional[Sequence[str]] = None, schema: str = "dataset") -> dict:
    """Load, override and validate a YAML data config.

    Args:
        path: the YAML file.
        data_root: folder that relative paths in the config resolve against; default: the YAML file's folder.
        overrides: ``"data.key=value"`` strings applied before validation.
        schema: ``"dataset"`` (pretraining / linear-probe configs) or ``"segmentation"`` (``main_segment.py``).

    Returns:
        ``{"data": {...}}`` with ``type`` lower-cased, defaults filled in and paths absolute.

    Raises:
        ConfigError: missing/unreadable file, invalid YAML, or any schema violation (names file and key).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({exc})") from None
    if overrides:
        raw = apply_overrides(raw, overrides, source, schema)
    base = Path(data_root) if data_root is not None else path.resolve().parent
    return validate_config(raw, source, base_dir=base, schema=schema)


def load_seg_config(path: PathLike, data_root: Optional[PathLike] = None,
                    overrides: Optional[Sequence[str]] = None) -> dict:
    """:func:`load_config` with the segmentation schema (:data:`SEG_SCHEMA`): ``{"data": {...}}`` with defaults
    filled in (``val_labels`` = ``labels`` when unset) and paths absolute; raises :class:`ConfigError`."""
    return load_config(path, data_root, overrides, schema="segmentation")


def save_config(cfg: Mapping, path: PathLike) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from util.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(_to_plain(cfg), sort_keys=False, default_flow_style=None))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def data_section(cfg: Mapping) -> dict:
    """Return the inner ``data`` mapping of a config (accepts either ``{"data": {...}}`` or the inner dict)."""
    if "data" in cfg and isinstance(cfg["data"], Mapping):
        return dict(cfg["data"])
    return dict(cfg)
