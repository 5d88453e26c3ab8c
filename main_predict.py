"""Segmentation maps of whole rasters with a main_segment.py checkpoint: sliding windows, overlap, smooth blending.

    python main_predict.py --input scene.tif --resume output_dir/seg/checkpoint-latest.pth --output_dir preds/
    torchrun --nproc_per_node=4 main_predict.py --input 'tiles/*.tif' --mosaic --resume ... --output_dir preds/

Each tile's read grid (at ``--gsd`` metres, default the checkpoint's training GSD, else the raster's own) is cut
into ``--input_size`` windows (default the checkpoint's) every ``input_size - overlap`` px; class probabilities of
overlapping windows are blended with linear edge ramps (``inference/blend.py``: no seams) and the arg-max is written
to ``<output_dir>/<tile>_pred.tif``: a uint8 Cloud-Optimized GeoTIFF (tiled, deflate, internal overviews) on the
read grid (the source's CRS and transform at that GSD); pixels without valid input stay nodata (255). Optional:
``_prob.tif`` (class probabilities), ``_pred.gpkg`` (polygons), ``_preview.png``. With ``--mosaic`` (tiles of one
mosaic) a tile's windows continue past each edge where another tile lies (``inference.tiling.neighbour_sides``,
``mosaic_margin``), read from every tile they touch: pixels near a tile edge get the neighbour's context and the
maps of neighbouring tiles meet without seams; each tile's files stay on its own grid. Output strips are split over
ranks in contiguous runs (``inference.tiling.runs``; a rank's consecutive strips reuse the windows they share, so
each window is predicted once per run) and kept in ``<output_dir>/.predict.blocks/`` until every tile is
written: a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import harness
from inference.blend import blend_strip, blend_weights, strip_bounds
from inference.tiling import Block, BlockStore, axis_starts, native_gsd, neighbour_sides, \
    open_scene, open_store, runs
from inference.inputs import add_reader_args, add_run_args, check_dtype, check_scene, check_upsampling, expand_inputs, \
    input_scaling, start, trained_bands, training_data
from util import dist as dist_util
from util.io import atomic_write

NODATA = 255
PROB_SCALE = 254  # probabilities in _prob.tif: uint8 value / PROB_SCALE


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Scale-MAE segmentation maps of rasters (sliding windows, blended)", add_help=True)
    g = p.add_argument_group("input")
    add_reader_args(g)
    g.add_argument("--gsd", default=None, type=float, help="read grid in metres (default the checkpoint's training "
                                                           "GSD, else the raster's own)")
    g.add_argument("--mosaic", action="store_true", help="tiles of one mosaic: windows near a tile edge with a "
                                                         "neighbouring tile reach into it (no seams between tiles)")
    g = p.add_argument_group("model")
    g.add_argument("--resume", required=True, help="segmentation checkpoint of main_segment.py")
    g.add_argument("--input_size", default=None, type=int, help="window px (default the checkpoint's)")
    g.add_argument("--overlap", default=None, type=int, help="px shared by neighbouring windows (default 1/4 "
                                                             "window; 0: no blending)")
    g.add_argument("--mean", nargs="+", type=float, default=None, help="per-band mean after --scale")
    g.add_argument("--std", nargs="+", type=float, default=None, help="per-band std after --scale")
    g.add_argument("--reference_gsd", default=None, type=float, help="metres per pixel of res = base_resolution "
                                                                     "(default the training data's, else --gsd)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=True, help="folder of the <tile>_pred.tif files")
    g.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    g.add_argument("--probabilities", action="store_true", help="also <tile>_prob.tif: class probabilities, one "
                                                                "uint8 band per class (value / 254; nodata 255)")
    g.add_argument("--polygons", action="store_true", help="also <tile>_pred.gpkg: polygons of the predicted "
                                                           "non-background classes")
    g.add_argument("--simplify", default=0.0, type=float, help="with --polygons: simplification tolerance in CRS "
                                                               "units (0 keeps the pixel outlines)")
    g.add_argument("--preview", action="store_true", help="also <tile>_preview.png: the class map in colour, "
                                                          "at most --preview_size px on a side")
    g.add_argument("--preview_size", default=1024, type=int, help="longest side of the preview PNG in px")
    g.add_argument("--blocksize", default=256, type=int, help="tile size of the output COGs and their overviews "
                                                              "in px (a power of two, 64 to 4096); overviews "
                                                              "halve until one fits a tile")
    add_run_args(g, batch_size=8, product="predictions")
    harness.add_distributed_args(p)
    return p


def load_segmenter(path: str) -> tuple[torch.nn.Module, dict, list, dict]:
    """``(model in eval mode, its training args, classes, its training data config)`` of a main_segment.py
    checkpoint (the data config: :func:`training_data`)."""
    import models_seg
    from util.checkpoint import strip_module_prefix

    ckpt = harness.read_checkpoint(path, "--resume")
    if harness.checkpoint_writer(ckpt) != "main_segment" or "model" not in ckpt:
        raise harness.UserError(f"--resume {path}: {harness.checkpoint_kind(ckpt) or 'not a checkpoint'}; "
                                f"main_predict.py takes a segmentation checkpoint of main_segment.py")
    saved = ckpt.get("args") or {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)
    state = strip_module_prefix(ckpt["model"])
    classes = list(ckpt.get("classes") or [])
    in_chans = int(state["backbone.patch_embed.proj.weight"].shape[1])
    model = models_seg.build_segmentation_model(
        saved["model"], len(classes), img_size=int(saved["input_size"]), in_chans=in_chans,
        out_indices=saved.get("out_indices"), channels=int(saved["head_channels"]),
        aux_channels=saved.get("aux_channels") or None)
    model.load_state_dict(state)
    return model.eval(), saved, classes, training_data(path, saved, ckpt.get("data"))


def training_gsd(data: dict) -> tuple[Optional[float], Optional[float]]:
    """``(read GSD, reference GSD)`` in metres of a training ``data`` section: its ``target_gsd`` (else its
    ``reference_gsd``) and its ``reference_gsd``; None where the config has none."""
    ref = data.get("reference_gsd")
    gsd = data.get("target_gsd") or ref
    return (float(gsd) if gsd else None), (float(ref) if ref else None)


def window_layout(args: argparse.Namespace, model: torch.nn.Module, saved: dict) -> tuple[int, int]:
    """``(window px, overlap px)``: ``--input_size`` (default the checkpoint's) and ``--overlap`` (default a quarter
    window); one line when the model cannot take them."""
    size = int(args.input_size or saved["input_size"])
    harness.require(size % model.patch_size == 0 and size >= 2 * model.patch_size,
                    f"--input_size {size}: must be a multiple of the patch {model.patch_size}, at least "
                    f"{2 * model.patch_size}")
    overlap = size // 4 if args.overlap is None else int(args.overlap)
    harness.require(0 <= overlap < size, f"--overlap {overlap}: must be in [0, --input_size)")
    return size, overlap


def open_rasters(args: argparse.Namespace, source: Any, gsd: Optional[float], reference_gsd: Optional[float],
                 size: int, bands: Optional[list], in_chans: int, trained: dict):
    """The scene on its read grid (``inference.tiling.open_scene``), checked against the model: CRS, band count,
    the training dtype (``trained``: the checkpoint's args and data config) and, for a ``gsd`` other than the
    files' own, upsampling (``--no_upsample``)."""
    label = " ".join(args.input)
    reader = dict(band_files=args.band_files, bands=bands, scene_glob=args.scene_glob, glob=args.glob, crs=args.crs,
                  nodata=args.nodata, scale=args.scale)
    if gsd is not None:
        native = open_scene(source, None, size, **reader)
        check_scene(native, in_chans, label)
        check_upsampling([gsd], native_gsd(native), args.no_upsample)  # also for the training GSD as default
    ds = open_scene(source, gsd, size, resampling=args.resampling, mosaic=args.mosaic, reference_gsd=reference_gsd,
                    **reader)
    check_scene(ds, in_chans, label)
    check_dtype(ds, trained, label, ignore=args.ignore_dtype)  # where the training run recorded one
    return ds


def plan_strips(ds, names: list[str], size: int, stride: int, mosaic: bool) -> tuple[list[Block], list[tuple]]:
    """``(strips, layouts)``: every output strip (``stride`` rows) of every tile, and each tile's window layout
    ``(row starts, col starts)`` (past the edges that have a neighbouring tile with ``mosaic``)."""
    plan, layouts = [], []
    for t, (h, w) in enumerate(ds.tile_shapes):
        top, bottom, left, right = neighbour_sides(ds, t) if mosaic else (False,) * 4
        layouts.append((axis_starts(h, size, stride, top, bottom), axis_starts(w, size, stride, left, right)))
        if not layouts[-1][0] or not layouts[-1][1]:
            raise harness.UserError(f"{names[t]}: the read grid ({h}x{w} px) is smaller than one {size} px window; "
                                    f"use a smaller --input_size or a finer --gsd"
                                    + ("" if mosaic else ", or --mosaic where it has neighbouring tiles"))
        plan += [Block(0, t, a) for a, _ in strip_bounds(h, stride)]
    return plan, layouts


def window_predictor(ds, model: torch.nn.Module, device: torch.device, size: int, mean: torch.Tensor,
                     std: torch.Tensor, base_resolution: float) -> Callable[[int], Callable]:
    """``predictor(tile)`` -> ``predict(windows)``: the windows ``[(row, col), ...]`` of ``tile`` read, normalised
    (invalid pixels at the band mean) and run at their ``res`` -> ``(probabilities [N, K, S, S], valid [N, S, S])``
    (``inference.blend.blend_strip``'s contract)."""
    from dataloaders.geotiff import WindowSpec
    from util.gsd import window_res

    def predictor(tile: int) -> Callable:
        @torch.no_grad()
        def predict(windows):
            imgs, res, valid = [], [], []
            for r, c in windows:
                s = ds.read_window(WindowSpec(tile, r, c, size, size))
                img = (s["image"] - mean[:, None, None]) / std[:, None, None]
                imgs.append(torch.where(s["mask"][None], img, torch.zeros(())))
                res.append(window_res(size, size, base_resolution) * s["res"])
                valid.append(s["mask"].numpy())
            logits = model(torch.stack(imgs).to(device), torch.tensor(res, device=device))
            return logits.float().softmax(1).cpu().numpy(), np.stack(valid)
        return predict
    return predictor


def predict_strips(strips: list[Block], layouts: list[tuple], ds, store: BlockStore, predictor: Callable,
                   size: int, stride: int, weights: np.ndarray, args: argparse.Namespace) -> tuple[int, int]:
    """Compute and save this rank's ``strips`` not yet in ``store`` (class ids, and probabilities with
    ``--probabilities``); consecutive strips of a tile share their window rows. Returns ``(computed, skipped)``."""
    computed = skipped = 0
    cache: dict = {}  # window rows shared with the next strip of the same tile (inference/blend.py)
    tile = None
    for block in strips:
        if block.tile != tile:
            cache, tile = {}, block.tile
        if store.done(block):
            skipped += 1
            cache.clear()  # the next strip predicts its windows anew
            continue
        h, w = ds.tile_shapes[block.tile]
        a, b = block.row, min(block.row + stride, h)
        probs, valid = blend_strip(predictor(block.tile), *layouts[block.tile], w, size, a, b, weights,
                                   args.batch_size, cache=cache)
        arrays = {"pred": np.where(valid, probs.argmax(0), NODATA).astype(np.uint8)}
        if args.probabilities:
            arrays["prob"] = np.where(valid[None], np.rint(probs * PROB_SCALE), NODATA).astype(np.uint8)
        store.save(block, arrays)
        computed += 1
    return computed, skipped


def main(args: argparse.Namespace) -> dict:
    """Predict every tile; returns ``{"outputs": [...], "computed_blocks", "skipped_blocks"}``."""
    device, rank, world = start(args)  # device, process group, GDAL cache cap, flag checks
    harness.check_writable(args.output_dir, "--output_dir", folder=True)
    source = expand_inputs(args.input, args.glob)
    model, saved, classes, data = load_segmenter(args.resume)
    trained_gsd, trained_ref = training_gsd(data)
    gsd = args.gsd if args.gsd is not None else trained_gsd
    reference_gsd = args.reference_gsd or trained_ref or gsd
    if rank == 0:
        print(f"read grid: {gsd:g} m ({'--gsd' if args.gsd is not None else 'the training GSD of the checkpoint'})"
              if gsd is not None else "read grid: each raster's native GSD (the checkpoint records no training GSD; "
                                      "pass --gsd to choose one)")
    model = model.to(device)
    in_chans = int(model.backbone.patch_embed.proj.weight.shape[1])
    size, overlap = window_layout(args, model, saved)
    stride = size - overlap
    args.scale, *stats = input_scaling(args, saved, data, in_chans)  # as trained, unless flags say otherwise
    mean, std = (torch.tensor(v) for v in stats)
    bands = trained_bands(args, data)
    ds = open_rasters(args, source, gsd, reference_gsd, size, bands, in_chans, {"args": saved, "data": data})
    out_dir = Path(args.output_dir)
    harness.require(64 <= args.blocksize <= 4096 and args.blocksize & (args.blocksize - 1) == 0,
                    f"--blocksize {args.blocksize}: must be a power of two from 64 to 4096 (GDAL writes the "
                    f"overviews of other sizes in 128 px tiles)")
    stems = [Path(str(p)).stem for p in ds.tile_index["path"]]
    if not args.overwrite:
        existing = [f"{stem}{suffix}" for stem in stems for suffix in output_suffixes(args)
                    if (out_dir / f"{stem}{suffix}").exists()]
        if existing:
            raise harness.UserError(f"--output_dir {out_dir}: {existing[0]} exists; pass --overwrite to replace it")
    plan, layouts = plan_strips(ds, [f"{stem}_pred.tif" for stem in stems], size, stride, args.mosaic)
    store = BlockStore(out_dir / ".predict.blocks")
    settings = {"resume": os.path.abspath(args.resume), "input": list(args.input), "gsd": gsd, "size": size,
                "overlap": overlap, "mean": mean.tolist(), "std": std.tolist(), "blocks": len(plan),
                "reference_gsd": reference_gsd, "scale": args.scale, "crs": args.crs, "nodata": args.nodata,
                "band_files": args.band_files, "bands": bands, "resampling": args.resampling,
                "probabilities": args.probabilities, "mosaic": args.mosaic}
    if rank == 0:
        harness.make_folder(out_dir, "--output_dir")
    open_store(store, settings, args.overwrite, len(plan), "strips")
    predictor = window_predictor(ds, model, device, size, mean, std, float(saved.get("base_resolution", 1.0)))
    computed, skipped = predict_strips(runs(plan, rank, world), layouts, ds, store, predictor, size, stride,
                                       blend_weights(size, overlap), args)
    dist_util.barrier()
    outputs = []
    if rank == 0:
        for t, stem in enumerate(stems):
            mine = sorted(b for b in plan if b.tile == t)
            outputs += [str(p) for p in write_outputs(out_dir, stem, store, mine, ds, t, classes, args)]
        store.remove()
        print(f"wrote {len(outputs)} file(s) for {len(stems)} raster(s) to {out_dir}")
    dist_util.cleanup()
    return {"outputs": outputs, "computed_blocks": computed, "skipped_blocks": skipped}


def output_suffixes(args: argparse.Namespace) -> list[str]:
    """File name endings written per tile (``<tile><suffix>``) with these flags."""
    return (["_pred.tif"] + (["_prob.tif"] if args.probabilities else []) + (["_pred.gpkg"] if args.polygons else [])
            + (["_preview.png"] if args.preview else []))


def write_cog(path: Path, profile: dict[str, Any], fill: Callable[[Any], None], overview_resampling: str,
              blocksize: int) -> Path:
    """A Cloud-Optimized GeoTIFF at ``path``, atomically: ``fill(dataset)`` writes the pixels (strip by strip)
    into a tiled staging GeoTIFF, which GDAL's COG driver copies with internal overviews (halving until one fits
    a ``blocksize`` tile, ``overview_resampling``), deflate compression and the COG IFD order."""
    import rasterio
    import rasterio.shutil

    def write(tmp: str) -> None:
        stage = f"{tmp}.stage.tif"
        try:
            with rasterio.open(stage, "w", driver="GTiff", tiled=True, blockxsize=blocksize, blockysize=blocksize,
                               compress="deflate", **profile) as dst:
                fill(dst)
            rasterio.shutil.copy(stage, tmp, driver="COG", BLOCKSIZE=blocksize, COMPRESS="DEFLATE",
                                 OVERVIEW_RESAMPLING=overview_resampling, OVERVIEWS="AUTO", BIGTIFF="IF_SAFER")
        finally:
            if os.path.exists(stage):
                os.unlink(stage)

    return atomic_write(path, write, by_name=True)


def write_outputs(out_dir: Path, stem: str, store: BlockStore, blocks: list, ds, tile: int, classes: list,
                  args: argparse.Namespace) -> list[Path]:
    """One tile's files from its finished strips ``blocks``: ``<stem>_pred.tif`` (uint8 class ids, nodata 255,
    palette) and, as asked, ``_prob.tif`` ([K] uint8 bands, probability * 254, nodata 255, same grid),
    ``_pred.gpkg`` (``util.seg_outputs.polygonize_strips`` of the class map's finished strips: the polygons of
    the whole map) and ``_preview.png``."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from util.seg_outputs import class_colour, polygonize_strips

    h, w = ds.tile_shapes[tile]
    crs = str(ds.tile_index["crs"].iloc[tile])
    transform = Affine(*ds.tile_index["transform"].iloc[tile][:6])
    grid = {"width": w, "height": h, "crs": crs, "transform": transform, "nodata": NODATA, "dtype": "uint8"}
    k = max(len(classes), 2)

    def fill(key: str) -> Callable[[Any], None]:
        def run(dst) -> None:
            for block in blocks:
                arr = store.load(block)[key]
                arr = arr[None] if arr.ndim == 2 else arr
                dst.write(arr, window=Window(0, block.row, w, arr.shape[1]))
            if key == "pred":
                dst.write_colormap(1, {c: (*class_colour(c), 255) for c in range(k)})
            else:  # the scale as metadata: unscaled values are probabilities; band names are the classes
                dst.scales = [1.0 / PROB_SCALE] * dst.count
                for i, name in enumerate(classes, 1):
                    dst.set_band_description(i, str(name))
        return run

    pred_path = write_cog(out_dir / f"{stem}_pred.tif", {**grid, "count": 1}, fill("pred"), "MODE", args.blocksize)
    written = [pred_path]
    if args.probabilities:
        written.append(write_cog(out_dir / f"{stem}_prob.tif", {**grid, "count": len(classes)}, fill("prob"),
                                 "AVERAGE", args.blocksize))
    if args.polygons:  # from the finished strips, one in memory at a time (plus the polygons)
        strips = ((block.row, store.load(block)["pred"]) for block in blocks)
        gdf = polygonize_strips(((r, np.where(s == NODATA, 0, s)) for r, s in strips),  # nodata: no region
                                transform, crs, classes, args.simplify)
        target = out_dir / f"{stem}_pred.gpkg"
        written.append(atomic_write(target, lambda tmp: gdf.to_file(tmp, layer="predictions", driver="GPKG"),
                                    by_name=True))
    if args.preview:
        from PIL import Image

        scale = min(1.0, args.preview_size / max(h, w))
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
        with rasterio.open(pred_path) as src:  # read from the overviews: memory of the preview only
            small = src.read(1, out_shape=shape, resampling=Resampling.nearest)
        lut = np.zeros((256, 4), np.uint8)
        lut[:k] = [(*class_colour(c), 255) for c in range(k)]
        target = out_dir / f"{stem}_preview.png"
        written.append(atomic_write(target, lambda tmp: Image.fromarray(lut[small], "RGBA").save(tmp, format="PNG"),
                                    by_name=True))
    return written


if __name__ == "__main__":
    harness.run(main, get_args_parser(), interrupted="the finished strips are kept in <--output_dir>/.predict.blocks/; "
                                                     "rerun the same command to resume there")
