#!/usr/bin/env python
"""main_embed.py throughput and memory against raster size: windows/s and peak RSS per raster side.

    python bench/bench_embed.py [--sizes 1024 4096] [--window 64] [--gsd 1 2] [--model mae_vit_tiny_patch16]

Prints one JSON object. For every side S a uint16 3-band S x S UTM GeoTIFF (tiled) is written to a temporary
folder and embedded by ``main_embed.main`` in a fresh process (so each peak RSS is that run's own) with a randomly
initialised model on CPU. The memory bound is a window batch plus one window row's embeddings, not the raster:
peak RSS should stay flat as S grows while the time grows with the window count. Wall-clock on a shared machine:
noisy.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from affine import Affine

    import main_embed
    import models_mae
    from dataloaders.synthetic import write_geotiff

    tmp = Path(args.tmp)
    torch.manual_seed(0)
    torch.save({"model": models_mae.MODELS[args.model]().state_dict(), "args": {"model": args.model}},
               tmp / "model.pth")
    side = args.child
    rng = np.random.default_rng(0)
    path = tmp / f"r{side}.tif"
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint16",
                       crs="EPSG:32610", transform=Affine(1.0, 0, 500000.0, 0, -1.0, 4200000.0), tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        for r0 in range(0, side, 1024):  # written in strips: the writer's memory stays small too
            h = min(1024, side - r0)
            dst.write(rng.integers(0, 3000, (3, h, side)).astype("uint16"),
                      window=rasterio.windows.Window(0, r0, side, h))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    argv = ["--input", str(path), "--checkpoint_path", str(tmp / "model.pth"), "--input_size", str(args.window),
            "--gsd", *map(str, args.gsd), "--scale", "3000", "--device", "cpu", "--batch_size", str(args.batch_size),
            "--output", str(tmp / f"r{side}.parquet"), "--overwrite"]
    start = time.perf_counter()
    result = main_embed.main(main_embed.get_args_parser().parse_args(argv))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"side": side, "windows": result["windows"], "seconds": round(seconds, 2),
                      "windows_per_s": round(result["windows"] / seconds, 1), "peak_rss_mib": round(peak / 1024, 1),
                      "rss_before_run_mib": round(base / 1024, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--gsd", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(side), "--tmp", tmp, "--window", str(args.window),
                   "--batch_size", str(args.batch_size), "--model", args.model, "--gsd", *map(str, args.gsd)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps({"bench": "embed", "model": args.model, "window": args.window, "gsd": args.gsd,
                      "device": "cpu", "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
