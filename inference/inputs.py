"""What the inference launchers (``main_embed.py``, ``main_predict.py``) share: the reader flags
(:func:`add_reader_args`), the input rasters (``--input`` paths and globs), the scene checked against the model (CRS,
band count, the pixel dtype it was trained on) and the normalisation."""
from __future__ import annotations

import argparse
import glob as globmod
import math
import os
from pathlib import Path
from typing import Any, Sequence

import harness
from dataloaders.config import GEO_TYPES, SEG_TYPES
from dataloaders.geo_read import RESAMPLING_METHODS
from dataloaders.pixel_dtype import RASTER_DTYPE_KEY

__all__ = ["add_reader_args", "add_run_args", "start", "check_flags", "check_crs", "POSITIVE_FLAGS", "training_data", "input_scaling",
           "trained_bands",
           "norm_stats", "expand_inputs", "check_scene", "recorded_dtype", "check_dtype", "check_upsampling",
           "UPSAMPLE_TOLERANCE"]

RASTER_TYPES = tuple(dict.fromkeys(GEO_TYPES + SEG_TYPES))  # data types read with a `scale` key (others: 8-bit images)

# a --gsd this much finer than the raster counts as upsampling (ground vs grid metres differ by a UTM scale factor)
UPSAMPLE_TOLERANCE = 0.01
# flags that are lengths, counts or factors: > 0 wherever an inference launcher has them (0 would give NaN pixels
# (--scale), no window (--gsd, --input_size), a degenerate positional embedding (--base_resolution) ...)
POSITIVE_FLAGS = ("gsd", "reference_gsd", "scale", "base_resolution", "input_size", "stride", "batch_size",
                  "preview_size")


def add_reader_args(group: Any, input_help: str = "") -> None:
    """The flags both inference launchers read rasters with (an ``argparse`` parser or argument group ``group``):
    ``--input`` (``input_help`` appended to its help), the GeoTIFF reader's options (``--band_files``,
    ``--scene_glob``, ``--glob``, ``--crs``, ``--nodata``, ``--scale``, ``--resampling``, as the data configs' keys)
    and the checks of the input against the model that a user may relax (``--no_upsample``, ``--ignore_dtype``)."""
    group.add_argument("--input", required=True, nargs="+",
                       help="raster file(s), folder(s) of GeoTIFFs or a quoted glob ('tiles/*.tif')" + input_help)
    group.add_argument("--band_files", nargs="+", default=None,
                       help="per-band file patterns of band-file scenes ('*_B04.tif' ...), stacked in order")
    group.add_argument("--scene_glob", default=None,
                       help="with --band_files: scene folders under --input ('*'; default: --input itself)")
    group.add_argument("--glob", default=None, help="file pattern under a folder --input (default *.tif / *.tiff)")
    group.add_argument("--crs", default=None, help="read every raster in this CRS (needed when they differ)")
    group.add_argument("--nodata", default=None, type=float, help="nodata value overriding the files' own")
    group.add_argument("--scale", default=None, type=float,
                       help="raw values are divided by it (default: the training data config's, else 1; 255 for "
                            "8-bit imagery)")
    group.add_argument("--bands", nargs="+", type=int, default=None,
                       help="1-based bands of each file to read, in order (default: the training data config's "
                            "bands, else all; not with --band_files)")
    group.add_argument("--no_upsample", action="store_true",
                       help="a read GSD finer than the raster is an error (default: a warning, the raster is "
                            "upsampled)")
    group.add_argument("--resampling", default=None, choices=RESAMPLING_METHODS,
                       help="warp method of reads at another GSD (default bilinear)")
    group.add_argument("--ignore_dtype", action="store_true",
                       help=f"read rasters whose pixel dtype differs from the one the checkpoint was trained on "
                            f"({RASTER_DTYPE_KEY}; default: an error), e.g. float32 rasters holding the training "
                            f"values: --scale must then bring them to the training range")


def add_run_args(group: Any, batch_size: int, product: str) -> None:
    """The run flags both inference launchers share (``--batch_size`` with its default, ``--device``, ``--seed``,
    ``--debug``; ``product``: what the seed does not change, e.g. ``"embeddings"``)."""
    group.add_argument("--batch_size", default=batch_size, type=int, help="windows per forward (bounds the memory)")
    group.add_argument("--device", default="cuda", help="cuda or cpu; falls back to cpu when CUDA is unavailable")
    group.add_argument("--seed", default=0, type=int, help=f"torch/numpy seed ({product} do not depend on it)")
    group.add_argument("--debug", action="store_true", help=f"tracebacks of errors (also {harness.DEBUG_ENV}=1)")


def start(args: argparse.Namespace) -> tuple[Any, int, int]:
    """What both inference launchers do first: ``harness.setup`` (device, process group), GDAL's block cache capped
    before any raster is read (``inference.tiling.bound_gdal_cache``; ``GDAL_CACHEMAX`` in the environment wins) and
    :func:`check_flags`. Returns ``(device, rank, world size)``."""
    from inference.tiling import bound_gdal_cache
    from util import dist as dist_util

    device = harness.setup(args)
    bound_gdal_cache()
    check_flags(args)
    return device, dist_util.get_rank(), dist_util.get_world_size()


def check_flags(args: argparse.Namespace) -> None:
    """One line, before any work (nothing read or written yet), for flag values no run can use: a length, count or
    factor of :data:`POSITIVE_FLAGS` that is not > 0 (or not finite), a ``--crs`` PROJ does not know."""
    harness.check_positive(args, *POSITIVE_FLAGS)
    check_crs(getattr(args, "crs", None), "--crs")


def check_crs(crs: str | None, flag: str) -> None:
    """One line when ``crs`` (given with ``flag``; None: not given) is not a CRS PROJ knows."""
    if crs is None:
        return
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError:
        raise harness.UserError(f"{flag} {crs}: not a CRS PROJ knows; give one such as EPSG:4326 (lon lat), "
                                f"EPSG:32633 (UTM 33N) or EPSG:3857") from None


def training_data(path: str, saved: dict, ckpt_data: Any = None) -> dict:
    """The ``data`` section of the config a checkpoint was trained with (``{}`` when not found).

    Looked up in order: the checkpoint's own ``data`` entry, the run's resolved ``config.yaml`` next to it
    (``harness.save_run_config``: ``{"args": ..., "data": ...}``), the YAML file of its ``--config``.
    """
    import yaml

    if isinstance(ckpt_data, dict):
        return dict(ckpt_data)
    candidates = [Path(path).resolve().parent / "config.yaml"]
    if saved.get("config"):
        candidates.append(Path(os.path.expanduser(str(saved["config"]))))
    for cand in candidates:
        try:
            doc = yaml.safe_load(cand.read_text(encoding="utf-8")) if cand.is_file() else None
        except (OSError, yaml.YAMLError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("data"), dict):
            return dict(doc["data"])
    return {}


def input_scaling(args: argparse.Namespace, saved_args: dict, data: dict, in_chans: int
                  ) -> tuple[float, list[float], list[float]]:
    """``(scale, mean, std)`` the pixels are read with, as the model was trained: each of ``--scale``, ``--mean``,
    ``--std`` given wins; else the training data config's (``data``: :func:`training_data`; an image-folder config
    was read as 8-bit images, i.e. scale 255), else the checkpoint's recorded mean/std, else scale 1 and ImageNet's
    mean/std (3 bands). Rank 0 prints one line saying which. One line when a length is wrong."""
    from util import dist as dist_util

    scale, scale_from = args.scale, "--scale"
    if scale is None and data:
        is_raster = data.get("type") in RASTER_TYPES
        scale, scale_from = (float(data.get("scale") or 1.0), "the training data config") if is_raster else             (255.0, "the training data config (8-bit images)")
    if scale is None:
        scale, scale_from = 1.0, "the default (nothing recorded)"
    trained = {"mean": data["mean"], "std": data["std"]} if isinstance(data.get("mean"), list) and \
        isinstance(data.get("std"), list) else saved_args
    mean, std = norm_stats(args, trained, in_chans)
    stats_from = "--mean/--std" if args.mean and args.std else \
        ("the training data config" if trained is not saved_args else "the checkpoint or ImageNet")
    if dist_util.is_main_process():
        print(f"input: values / {scale:g} (from {scale_from}), then mean/std from {stats_from}")
    return float(scale), mean, std


def trained_bands(args: argparse.Namespace, data: dict) -> list[int] | None:
    """The 1-based bands to read: ``--bands``, else the training data config's ``bands`` (a raster config, and no
    ``--band_files`` given: rank 0 says so in one line), else None (every band)."""
    from util import dist as dist_util

    if args.bands is not None:
        if args.band_files:
            raise harness.UserError("--bands: selects bands of multi-band files; with --band_files the band files "
                                    "are the bands (drop one of the two)")
        if min(args.bands) < 1:
            raise harness.UserError(f"--bands {' '.join(map(str, args.bands))}: band numbers start at 1")
        return list(args.bands)
    bands = data.get("bands") if data.get("type") in RASTER_TYPES and not args.band_files else None
    if bands and dist_util.is_main_process():
        print(f"input: bands {' '.join(map(str, bands))} (from the training data config)")
    return [int(b) for b in bands] if bands else None


def norm_stats(args: argparse.Namespace, saved_args: dict, in_chans: int) -> tuple[list[float], list[float]]:
    """--mean/--std, else the checkpoint's, else ImageNet's (3 bands); one line when the length is wrong."""
    from util.weights import IMAGENET_MEAN, IMAGENET_STD, find_norm_stats

    found = find_norm_stats({"args": saved_args})
    mean = args.mean or (found[0] if found else (list(IMAGENET_MEAN) if in_chans == 3 else None))
    std = args.std or (found[1] if found else (list(IMAGENET_STD) if in_chans == 3 else None))
    for flag, v in (("--mean", mean), ("--std", std)):
        if v is None:
            raise harness.UserError(f"{flag}: the checkpoint records no normalisation for its {in_chans} bands; "
                                    f"pass {flag} with {in_chans} values")
        if len(v) != in_chans:
            raise harness.UserError(f"{flag}: {len(v)} values, but the model takes {in_chans} bands")
    if not all(math.isfinite(float(x)) for x in list(mean) + list(std)) or min(float(s) for s in std) <= 0:
        raise harness.UserError(f"--mean {' '.join(f'{float(x):g}' for x in mean)} --std "
                                f"{' '.join(f'{float(x):g}' for x in std)}: every std must be > 0 and every value "
                                f"finite (a std of 0 divides by zero)")
    return [float(x) for x in mean], [float(x) for x in std]


def expand_inputs(items: list[str], glob: str | None = None, images: Sequence[str] = ()) -> Any:
    """--input as the reader's source: one path as is, globs expanded (one line when nothing matches); a folder
    with no GeoTIFF under it (nor a file of the suffixes ``images``, e.g. main_embed.py's JPEG/PNG) is one line
    too, unless ``glob`` (``--glob``) names the files to read."""
    from dataloaders.geo_index import RASTER_SUFFIXES

    paths: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            hits = sorted(globmod.glob(os.path.expanduser(item)))
            if not hits:
                raise harness.UserError(f"--input {item}: the pattern matches no file")
            paths.extend(hits)
        else:
            path = os.path.expanduser(item)
            if not os.path.exists(path):
                raise harness.UserError(f"--input {item}: not found")
            suffixes = tuple(RASTER_SUFFIXES) + tuple(images)
            if os.path.isdir(path) and glob is None and not any(
                    name.lower().endswith(suffixes) for _, _, names in os.walk(path) for name in names):
                kinds = "GeoTIFF (.tif, .tiff)" + (f" or {'/'.join(s.lstrip('.').upper() for s in images)} "
                                                   f"image" if images else "")
                raise harness.UserError(f"--input {item}: a folder with no {kinds} file in it; give the "
                                        f"rasters' folder, files or a quoted glob, or --glob PATTERN for other names")
            paths.append(path)
    return paths[0] if len(paths) == 1 else paths


def check_scene(ds, in_chans: int, source: str) -> None:
    """One line for a scene the model cannot take: no CRS, several CRSs, another band count."""
    crs = {str(c) for c in ds.tile_index["crs"]}
    if any(c in ("", "None") for c in crs):
        raise harness.UserError(f"--input {source}: a raster has no CRS (not georeferenced); assign one "
                                f"(gdal_edit.py -a_srs EPSG:...) first")
    if len(crs) > 1:
        raise harness.UserError(f"--input {source}: rasters in {len(crs)} CRSs ({', '.join(sorted(crs)[:3])}); "
                                f"pass --crs to read them all in one")
    if ds.num_bands != in_chans:
        raise harness.UserError(f"--input {source}: {ds.num_bands} band(s), but the model takes {in_chans}; "
                                f"select bands (--bands, or --band_files) matching its training data")


def recorded_dtype(saved_args: Any) -> str | None:
    """The raster dtype a checkpoint's saved args record (key ``raster_dtype`` at any depth: the training launchers
    save it in their args, ``harness.record_raster_dtype``), else None (the released checkpoint, checkpoints written
    before it was recorded, runs on mixed dtypes: the check is then skipped)."""
    stack = [saved_args] if isinstance(saved_args, dict) else []
    while stack:
        item = stack.pop()
        if isinstance(item.get(RASTER_DTYPE_KEY), str):
            return item[RASTER_DTYPE_KEY]
        stack.extend(v for v in item.values() if isinstance(v, dict))
    return None


def check_dtype(ds, saved_args: Any, source: str, ignore: bool = False) -> None:
    """One line when the scene's pixel dtype differs from the one the checkpoint was trained on (where recorded);
    ``ignore`` (``--ignore_dtype``): one ``NOTE:`` line (rank 0) instead, and the run goes on."""
    from util import dist as dist_util

    want = recorded_dtype(saved_args)
    if want is None:
        return
    have = sorted({str(d) for d in ds.tile_index["dtype"]})
    if have == [want]:
        return
    line = f"--input {source}: pixels of dtype {', '.join(have)}, but the checkpoint was trained on {want} rasters"
    if not ignore:
        raise harness.UserError(f"{line}; convert them (gdal_translate -ot ...), use a checkpoint trained on "
                                f"{', '.join(have)} data, or pass --ignore_dtype if --scale brings their values to "
                                f"the training range")
    if dist_util.is_main_process():
        print(f"NOTE: {line} (--ignore_dtype: read as they are)")


def check_upsampling(gsds: Sequence[float], finest: float, refuse: bool, flag: str = "--gsd") -> None:
    """Read GSDs finer than the scene's ``finest`` ground GSD (metres): one warning line naming them all (rank 0
    prints), or one error line with ``refuse`` (``--no_upsample``)."""
    from util import dist as dist_util

    finer = [float(g) for g in gsds if g < finest * (1 - UPSAMPLE_TOLERANCE)]
    if not finer:
        return
    line = f"{flag} {' '.join(f'{g:g}' for g in finer)}: finer than the raster ({finest:.4g} m per pixel), so " \
           f"windows are upsampled (no new detail)"
    if refuse:
        raise harness.UserError(f"{line}; give a coarser {flag} or drop --no_upsample")
    if dist_util.is_main_process():
        print(f"WARNING: {line}")