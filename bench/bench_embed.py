#!/usr/bin/env python
"""main_embed.py throughput and memory against raster size: windows/s and peak RSS per raster side.

    python bench/bench_embed.py [--sizes 1024 4096] [--window 64] [--gsd 1 2] [--model mae_vit_tiny_patch16]

Prints one JSON object. For every side S a uint16 3-band S x S UTM GeoTIFF (tiled 256 px, uncompressed) is written
to a temporary folder by this process (in strips, GDAL cache capped: the writer's memory stays small) and embedded
by ``main_embed.main`` in a fresh child process that does nothing else, with a randomly initialised model on CPU;
each peak RSS is that child's own (``VmHWM``, not ``ru_maxrss``, which on Linux includes the parent's: see
:func:`own_rss_mib`). The memory bound is a window batch, one window row's embeddings, one GeoParquet row group
and GDAL's block cache (capped by the launcher, ``inference.tiling.bound_gdal_cache``, unless the environment sets
``GDAL_CACHEMAX``), not the raster: peak RSS should stop growing once the raster exceeds the cache while the time
grows with the window count. Wall-clock on a shared machine: noisy; each run records the load average before and
after it.

``bench/bench_predict.py`` measures ``main_predict.py`` the same way with the helpers of this file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_raster(path: Path, side: int, dtype: str, high: int, seed: int = 0) -> Path:
    """A 3-band ``side`` x ``side`` UTM GeoTIFF of uniform random values in ``[0, high)`` (1 m pixels, 256 px tiles,
    uncompressed), written 1024 rows at a time with GDAL's block cache capped at 64 MiB."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    with rasterio.Env(GDAL_CACHEMAX=64 * 2**20), \
            rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype=dtype,
                          crs="EPSG:32610", transform=Affine(1.0, 0, 500000.0, 0, -1.0, 4200000.0), tiled=True,
                          blockxsize=256, blockysize=256, BIGTIFF="IF_SAFER") as dst:
        for r0 in range(0, side, 1024):
            h = min(1024, side - r0)
            dst.write(rng.integers(0, high, (3, h, side), dtype=dtype), window=Window(0, r0, side, h))
    return path


def started() -> tuple[str, str]:
    """``(commit, UTC date)`` now: call it when the bench begins (the tree may change while it runs)."""
    return commit(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def commit() -> str:
    """The repository's short commit, ``+dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def own_rss_mib() -> tuple[float, float]:
    """``(current, peak)`` resident set size of this process in MiB (``bench_utils``: ``VmRSS``/``VmHWM`` on Linux,
    the child's own, not the parent's high-water mark that ``ru_maxrss`` carries over)."""
    from bench_utils import current_rss, peak_rss

    return round(current_rss() / 2**20, 1), round(peak_rss() / 2**20, 1)


def measure(run: Callable[[], dict], windows: Callable[[dict], dict]) -> dict:
    """Run ``run()`` (a launcher's ``main``) in this (fresh) process: seconds, this process's peak RSS (MiB,
    :func:`own_rss_mib`) and its RSS before the run (imports done), the load average before and after, GDAL's block
    cache limit in force after the run (MiB), and the counts ``windows(result)`` gives; ``windows_per_s`` uses its
    ``windows`` entry."""
    from rasterio.env import get_gdal_config

    before, _ = own_rss_mib()
    load0 = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    _, peak = own_rss_mib()
    counts = windows(result)
    return {**counts, "seconds": round(seconds, 2), "windows_per_s": round(counts["windows"] / seconds, 1),
            "peak_rss_mib": peak, "rss_before_run_mib": before,
            "gdal_cache_mib": round(int(get_gdal_config("GDAL_CACHEMAX")) / 2**20, 1),
            "GDAL_CACHEMAX_env": os.environ.get("GDAL_CACHEMAX"),
            "load_avg_before": load0, "load_avg_after": [round(v, 2) for v in os.getloadavg()]}


def run_sides(script: str, sizes: list[int], prepare: Callable[[Path, int], list[str]], tmp: Path) -> list[dict]:
    """For each side: ``prepare(tmp, side)`` writes the inputs and returns the child's arguments; ``script
    --child ...`` runs in a fresh process (stderr passed through) and prints one JSON line; its raster is deleted
    after the run, with the outputs. Returns the rows."""
    rows = []
    for side in sizes:
        child_args = prepare(tmp, side)
        proc = subprocess.run([sys.executable, script, "--child", str(side), "--tmp", str(tmp), *child_args],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
        for f in tmp.glob(f"r{side}.*"):  # the raster and the outputs: a 20 000 px raster is GBs
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        if proc.returncode:
            rows.append({"side": side, "ok": False, "returncode": proc.returncode})
            continue
        rows.append({"side": side, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def report(bench: str, args: argparse.Namespace, rows: list[dict], started: tuple[str, str], **extra: Any) -> None:
    """Print the bench's JSON object (settings, machine, ``started`` = (commit, UTC date) when it began, runs)."""
    from bench_utils import machine_info

    info = machine_info()
    print(json.dumps({"bench": bench, "model": args.model, "window": args.window, **extra, "device": "cpu",
                      "commit": started[0], "date": started[1],
                      "machine": {k: info[k] for k in ("cpu", "cpu_count", "mem_total_gib", "torch")},
                      "runs": rows}, indent=1))


def sides_parser(doc: str, window: int, batch_size: int) -> argparse.ArgumentParser:
    """The flags every raster-size bench shares: ``--sizes``, ``--window``, ``--batch_size`` and the hidden
    ``--child SIDE --tmp DIR`` with which :func:`run_sides` starts one measured process per side."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="raster sides in px")
    p.add_argument("--window", type=int, default=window, help="--input_size (px, a multiple of 16)")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    return p


def child(args: argparse.Namespace) -> None:
    import main_embed

    tmp, side = Path(args.tmp), args.child
    argv = ["--input", str(tmp / f"r{side}.tif"), "--checkpoint_path", str(tmp / "model.pth"), "--input_size",
            str(args.window), "--scale", "3000", "--device", "cpu", "--batch_size", str(args.batch_size),
            "--output", str(tmp / f"r{side}.parquet"), "--overwrite"] + \
        (["--gsd", *map(str, args.gsd)] if args.gsd else [])
    parsed = main_embed.get_args_parser().parse_args(argv)
    print(json.dumps({"side": side, **measure(lambda: main_embed.main(parsed), lambda r: {"windows": r["windows"]})}))


def main() -> None:
    p = sides_parser(__doc__, window=64, batch_size=32)
    p.add_argument("--gsd", type=float, nargs="*", default=[1.0, 2.0],
                   help="GSDs to embed at (none: the raster's own, main_embed.py's default)")
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return
    begun = started()
    import torch

    import models_mae

    def prepare(tmp: Path, side: int) -> list[str]:
        write_raster(tmp / f"r{side}.tif", side, "uint16", 3000)
        return ["--window", str(args.window), "--batch_size", str(args.batch_size), "--model", args.model,
                "--gsd", *map(str, args.gsd)]

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        torch.save({"model": models_mae.MODELS[args.model]().state_dict(), "args": {"model": args.model}},
                   Path(tmp) / "model.pth")
        rows = run_sides(__file__, args.sizes, prepare, Path(tmp))
    report("embed", args, rows, begun, gsd=args.gsd or "native", batch_size=args.batch_size)


if __name__ == "__main__":
    main()
