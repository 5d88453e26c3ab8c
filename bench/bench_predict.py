#!/usr/bin/env python
"""main_predict.py throughput and memory against raster size: windows/s and peak RSS per raster side.

    python bench/bench_predict.py [--sizes 1024 4096] [--window 224] [--overlap 0] [--model vit_tiny_patch16]

Prints one JSON object. For every side S a uint8 3-band S x S UTM GeoTIFF (1 m, tiled, uncompressed) is written
(``bench_embed.write_raster``) and segmented by ``main_predict.main`` in a fresh child process that does nothing
else (peak RSS = that run's own), on the raster's own grid, with a randomly initialised segmentation checkpoint of
the layout ``main_predict.load_segmenter`` reads (``--model`` backbone + UPerNet of ``--head_channels``, 3 classes)
on CPU, writing the class map COG and nothing else unless ``--probabilities``. Per run: ``grid_windows`` (the window
grid), ``forwards`` (windows run through the model, counted: one process predicts each window once, the strip
cache of ``inference/blend.py``), windows/s (of ``forwards``, end to end: model load and COG writing included) and
peak RSS (the child's own, ``bench_embed.own_rss_mib``). The memory bound is one output strip (``K x stride x S`` float32 plus ``stride x S``
weights) plus a window batch and GDAL's block cache (capped by the launcher unless ``GDAL_CACHEMAX`` is set): peak
RSS should stop growing once the raster exceeds the cache, but for the strip, which grows with S (the width).
Wall-clock on a shared machine: noisy (load average recorded per run).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_embed also puts the repository on sys.path
from bench_embed import measure, report, run_sides, sides_parser, started, write_raster  # noqa: E402

CLASSES = ["background", "a", "b"]


def count_forwards(main_predict) -> dict:
    """Count the windows ``main_predict`` runs through its model (the loaded model's forward wrapped); returns the
    live counter ``{"forwards": n}``."""
    counter = {"forwards": 0}
    load = main_predict.load_segmenter

    def counted(path: str):
        model, *rest = load(path)
        forward = model.forward

        def run(x, *a, **k):
            counter["forwards"] += int(x.shape[0])
            return forward(x, *a, **k)

        model.forward = run
        return (model, *rest)

    main_predict.load_segmenter = counted
    return counter


def child(args: argparse.Namespace) -> None:
    import main_predict

    tmp, side = Path(args.tmp), args.child
    argv = ["--input", str(tmp / f"r{side}.tif"), "--resume", str(tmp / "seg.pth"), "--scale", "255",
            "--device", "cpu", "--input_size", str(args.window), "--overlap", str(args.overlap),
            "--batch_size", str(args.batch_size), "--output_dir", str(tmp / f"r{side}.out"), "--overwrite"] + \
        ["--probabilities"] * args.probabilities
    parsed = main_predict.get_args_parser().parse_args(argv)
    from inference.tiling import axis_starts

    stride = args.window - args.overlap
    grid = len(axis_starts(side, args.window, stride)) ** 2
    counter = count_forwards(main_predict)
    row = measure(lambda: main_predict.main(parsed), lambda r: {"windows": counter["forwards"], "grid_windows": grid,
                                                               "strips": r["computed_blocks"]})
    row["forwards"] = row.pop("windows")  # windows_per_s counts the forwards
    print(json.dumps({"side": side, **row}))


def main() -> None:
    p = sides_parser(__doc__, window=224, batch_size=8)
    p.add_argument("--overlap", type=int, default=0, help="--overlap (px; main_predict's default is window // 4)")
    p.add_argument("--model", default="vit_tiny_patch16", help="backbone of models_seg.build_segmentation_model")
    p.add_argument("--head_channels", type=int, default=32)
    p.add_argument("--probabilities", action="store_true", help="also write the class probabilities COG")
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return
    begun = started()
    import shutil

    import torch

    import models_seg

    def prepare(tmp: Path, side: int) -> list[str]:
        shutil.rmtree(tmp / f"r{side}.out", ignore_errors=True)
        write_raster(tmp / f"r{side}.tif", side, "uint8", 256)
        return ["--window", str(args.window), "--overlap", str(args.overlap), "--batch_size", str(args.batch_size)] \
            + ["--probabilities"] * args.probabilities

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = models_seg.build_segmentation_model(args.model, len(CLASSES), img_size=args.window,
                                                    channels=args.head_channels, aux_channels=0)
        torch.save({"model": model.state_dict(), "classes": CLASSES, "writer": "main_segment",
                    "args": {"model": args.model, "input_size": args.window, "head_channels": args.head_channels,
                             "aux_channels": 0, "out_indices": None, "base_resolution": 1.0}},
                   Path(tmp) / "seg.pth")
        rows = run_sides(__file__, args.sizes, prepare, Path(tmp))
    report("predict", args, rows, begun, overlap=args.overlap, batch_size=args.batch_size,
           head_channels=args.head_channels, probabilities=args.probabilities)


if __name__ == "__main__":
    main()
