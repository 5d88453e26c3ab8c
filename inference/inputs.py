"""What the inference launchers (``main_embed.py``, ``main_predict.py``) check and resolve the same way: the input
rasters (``--input`` paths and globs), the scene against the model (CRS, band count) and the normalisation."""
from __future__ import annotations

import argparse
import glob as globmod
import os
from typing import Any, Sequence

import harness

__all__ = ["norm_stats", "expand_inputs", "check_scene", "recorded_dtype", "check_dtype", "check_upsampling",
           "UPSAMPLE_TOLERANCE"]

# a --gsd this much finer than the raster counts as upsampling (ground vs grid metres differ by a UTM scale factor)
UPSAMPLE_TOLERANCE = 0.01


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
    return [float(x) for x in mean], [float(x) for x in std]


def expand_inputs(items: list[str]) -> Any:
    """--input as the reader's source: one path as is, globs expanded (one line when nothing matches)."""
    paths: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            hits = sorted(globmod.glob(os.path.expanduser(item)))
            if not hits:
                raise harness.UserError(f"--input {item}: the pattern matches no file")
            paths.extend(hits)
        else:
            if not os.path.exists(os.path.expanduser(item)):
                raise harness.UserError(f"--input {item}: not found")
            paths.append(os.path.expanduser(item))
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
                                f"select bands (--band_files) matching its training data")


def recorded_dtype(saved_args: Any) -> str | None:
    """The raster dtype a checkpoint's saved args record (key ``raster_dtype`` at any depth, e.g. a data config's),
    else None (no checkpoint of this project records it yet: the check is then skipped)."""
    stack = [saved_args] if isinstance(saved_args, dict) else []
    while stack:
        item = stack.pop()
        if isinstance(item.get("raster_dtype"), str):
            return item["raster_dtype"]
        stack.extend(v for v in item.values() if isinstance(v, dict))
    return None


def check_dtype(ds, saved_args: Any, source: str) -> None:
    """One line when the scene's pixel dtype differs from the one the checkpoint was trained on (where recorded)."""
    want = recorded_dtype(saved_args)
    if want is None:
        return
    have = sorted({str(d) for d in ds.tile_index["dtype"]})
    if have != [want]:
        raise harness.UserError(f"--input {source}: pixels of dtype {', '.join(have)}, but the checkpoint was "
                                f"trained on {want} rasters; convert them (gdal_translate -ot ...) or use a checkpoint "
                                f"trained on {', '.join(have)} data")


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