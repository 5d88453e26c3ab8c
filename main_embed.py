"""Per-window Scale-MAE embeddings of whole rasters at one or several GSDs, written as GeoParquet.

    python main_embed.py --input ortho.tif --checkpoint_path scalemae-vitlarge-800.pth --gsd 0.3 0.6 1.2 \
        --output ortho_embeddings.parquet --scale 255
    torchrun --nproc_per_node=4 main_embed.py --input 'tiles/*.tif' --mosaic ...   # window rows sharded over ranks
    python main_embed.py --input S2/ --scene_glob '*' --band_files '*_B04.tif' '*_B03.tif' '*_B02.tif' ...  # band-file scenes

Each window (``--input_size`` px on the read grid of each ``--gsd``, every ``--stride`` px) is read by the project's
GeoTIFF reader, normalised (``--scale``, ``--mean``/``--std``), and encoded with ``res`` =
``window_res(S, S, base_resolution) * reference_gsd_factor(gsd, reference_gsd)`` (``util/gsd.py``). One row per
window: ``geometry`` (footprint in the raster's CRS), ``footprint_wgs84`` (WKT, EPSG:4326), ``source``, ``tile``,
``row``/``col``/``height``/``width`` (on that GSD's read grid), ``gsd`` (asked), ``gsd_read`` (measured), ``res``,
``valid_fraction`` and ``embedding_cls`` / ``embedding_mean`` (fixed-size float32 lists; ``--pool``).

Finished window rows are kept in ``<output>.blocks/`` while the run goes on: a killed run, started again with the
same flags, computes only the rows it had not finished. The output is written once, complete, at the end.
Search: ``python tools/search_embeddings.py OUTPUT --point X Y`` (``inference/search.py``).
``--dense PATH.tif``: the patch tokens too, as a D-band GeoTIFF at 1/patch of the read grid (:func:`write_dense`).
Folders of plain JPEG/PNG images (no georeferencing): one row per image at the one ``--gsd`` given
(:func:`embed_images`; sharded and resumed in blocks of ``--batch_size`` images). Exported encoders are normalised
with the mean/std their export recorded. A raster of another pixel dtype than the checkpoint's ``raster_dtype`` is
refused unless ``--ignore_dtype``.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import harness
from inference.tiling import Block, BlockStore, batches, blocks_of, native_gsd, open_scene, open_store, shard, \
    window_grid
from inference.inputs import add_reader_args, add_run_args, check_dtype, check_scene, check_upsampling, expand_inputs, \
    input_scaling, start, trained_bands, training_data
from util import dist as dist_util

POOLS = ("cls", "mean")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # plain images: no georeferencing, one embedding per image


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Scale-MAE per-window embeddings of rasters (GeoParquet)", add_help=True)
    g = p.add_argument_group("input")
    add_reader_args(g, input_help="; or plain JPEG/PNG images, a folder of them (no GeoTIFF in it) or their glob")
    g.add_argument("--mosaic", action="store_true", help="windows may cross tile edges (read from every tile)")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint_path", required=True,
                   help="released checkpoint, main_pretrain.py checkpoint or exported encoder (.safetensors/.pth)")
    g.add_argument("--input_size", default=None, type=int,
                   help="window side in px shown to the model (default: the checkpoint's image size)")
    g.add_argument("--stride", default=None, type=int, help="px between window origins (default --input_size)")
    g.add_argument("--pool", nargs="+", default=list(POOLS), choices=POOLS,
                   help="cls token and/or mean of the patch tokens, both after the final norm (default both)")
    g.add_argument("--mean", nargs="+", type=float, default=None,
                   help="per-band mean after --scale (default: the checkpoint's, else ImageNet's for 3 bands)")
    g.add_argument("--std", nargs="+", type=float, default=None, help="per-band std (as --mean)")
    g.add_argument("--base_resolution", default=1.0, type=float, help="res of a window at --reference_gsd")
    g.add_argument("--reference_gsd", default=None, type=float,
                   help="metres per pixel that map to res = base_resolution (default: the finest --gsd)")
    g = p.add_argument_group("run")
    g.add_argument("--gsd", nargs="+", type=float, default=None,
                   help="ground sample distances in metres to embed at (default: the raster's own)")
    g.add_argument("--output", required=True, help="GeoParquet file to write (.parquet)")
    g.add_argument("--dense", default=None, metavar="PATH.tif",
                   help="also write the patch tokens as a float32 GeoTIFF of D bands at 1/patch of the read grid "
                        "(one raster; several --gsd: PATH_<gsd>m.tif); window origins snap to the patch")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output (once the new one is "
                                                            "complete)")
    add_run_args(g, batch_size=16, product="embeddings")
    harness.add_distributed_args(p)
    return p


# ---------------------------------------------------------------------------------------------------- model
def load_encoder(path: str) -> tuple[torch.nn.Module, dict]:
    """``(encoder in eval mode, saved args)`` of any checkpoint layout ``harness.pretrained.read_pretrained`` reads
    (released, main_pretrain.py, exported encoder); decoder tensors are dropped by ``models_vit``'s loader."""
    import models_vit
    from harness.pretrained import read_pretrained

    state, saved_args = read_pretrained(path)
    if not saved_args:  # an exported encoder: its metadata records the input normalisation (util/weights.py)
        saved_args = exported_metadata(path)
    if any(k.startswith("head.") for k in state):
        raise harness.UserError(f"--checkpoint_path {path}: a classifier checkpoint (it has a head.*: linear probe or "
                                f"fine-tuning); export its encoder first (python tools/export_encoder.py {path} "
                                f"--output PREFIX) and pass PREFIX.safetensors")
    try:
        model = models_vit.import_encoder(state)
    except ValueError as err:
        raise harness.UserError(f"--checkpoint_path {path}: not a Scale-MAE encoder ({' '.join(str(err).split())})") \
            from None
    return model.eval(), dict(saved_args or {})


def exported_metadata(path: str) -> dict:
    """``{'input_normalization': {'mean', 'std'}, ...}`` of an encoder written by ``tools/export_encoder.py`` (the
    safetensors header, else the sidecar ``.json`` next to a ``.pth``); ``{}`` for any other file."""
    import json

    from util.weights import FORMAT

    meta: dict = {}
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = {k: json.loads(v) if v[:1] in "[{" else v for k, v in (f.metadata() or {}).items()}
        elif Path(path).with_suffix(".json").is_file():
            meta = json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else {}


@torch.no_grad()
def embed_batch(model: torch.nn.Module, images: torch.Tensor, res: torch.Tensor, pools: list[str]
                ) -> dict[str, np.ndarray]:
    """images ``[N, C, S, S]`` (normalised), res ``[N]`` -> ``{pool: [N, D]}``: the cls token and/or the mean of the
    patch tokens of ``forward_features`` (after the final norm); ``'patch'`` in ``pools``: the patch tokens
    themselves, ``[N, S/p, S/p, D]``."""
    tokens = model.forward_features(images, res)
    out = {}
    if "cls" in pools:
        out["cls"] = tokens[:, 0].float().cpu().numpy()
    if "mean" in pools:
        out["mean"] = tokens[:, model.num_prefix_tokens:].mean(1).float().cpu().numpy()
    if "patch" in pools:  # [N, S/p, S/p, D] on the window's patch grid
        n, grid = tokens.shape[0], int(round(math.sqrt(tokens.shape[1] - model.num_prefix_tokens)))
        out["patch"] = tokens[:, model.num_prefix_tokens:].reshape(n, grid, grid, -1).float().cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------------- input
def check_output(args: argparse.Namespace) -> Path:
    out = Path(args.output)
    if out.suffix.lower() not in (".parquet", ".geoparquet"):
        raise harness.UserError(f"--output {out}: give a .parquet file name (GeoParquet)")
    if out.is_dir():
        raise harness.UserError(f"--output {out}: is a folder; give a .parquet file name")
    if out.exists() and not args.overwrite:
        raise harness.UserError(f"--output {out} exists; pass --overwrite to replace it (or choose another name)")
    if args.dense is not None and Path(args.dense).suffix.lower() not in (".tif", ".tiff"):
        raise harness.UserError(f"--dense {args.dense}: give a .tif file name (GeoTIFF)")
    harness.check_writable(out, "--output")
    if args.dense is not None:
        harness.check_writable(args.dense, "--dense")
    return out


def trained_size(model: torch.nn.Module, saved_args: dict) -> int:
    """The window side (px) the checkpoint was trained at: its saved ``input_size``, else the side of its stored
    positional-embedding table (``[1, 1 + g * g, D]``: ``g`` patches; 224 for the released checkpoint)."""
    saved = saved_args.get("input_size")
    if isinstance(saved, int) and saved > 0:
        return saved
    grid = math.isqrt(int(model.pos_embed.shape[1]) - model.num_prefix_tokens)
    return grid * int(model.patch_embed.patch_size[0])


def dense_paths(dense: str, gsds: list[float]) -> list[Path]:
    """The dense GeoTIFF of each GSD: ``dense`` itself for one GSD, ``<stem>_<gsd>m<suffix>`` for several."""
    p = Path(dense)
    return [p] if len(gsds) == 1 else [p.with_name(f"{p.stem}_{g:g}m{p.suffix}") for g in gsds]


def _window_rows(ds, windows: list[tuple[int, int, int]], size: int, base_resolution: float,
                 mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read and normalise windows: ``(images [N, C, S, S], res [N], per-window columns)``."""
    from dataloaders.geotiff import WindowSpec
    from util.gsd import window_res

    images, res, meta = [], [], {k: [] for k in ("gsd_read", "valid_fraction", "transform")}
    for t, r, c in windows:
        s = ds.read_window(WindowSpec(t, r, c, size, size))
        img = (s["image"] - mean[:, None, None]) / std[:, None, None]
        img = torch.where(s["mask"][None], img, torch.zeros(()))  # invalid pixels at the band mean
        images.append(img)
        res.append(window_res(size, size, base_resolution) * s["res"])
        meta["gsd_read"].append(float(s["gsd"]))
        meta["valid_fraction"].append(float(s["mask"].float().mean()))
        meta["transform"].append(np.asarray(s["transform"], dtype=np.float64))
    return torch.stack(images), torch.tensor(res, dtype=torch.float32), meta


# ---------------------------------------------------------------------------------------------- plain images
def image_files(source: Any) -> list[str]:
    """The JPEG/PNG files of ``--input`` when it holds no GeoTIFF (a folder of images, image paths or a glob), else
    ``[]`` (the GeoTIFF reader takes it)."""
    paths = [source] if isinstance(source, str) else list(source)
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            inside = sorted(str(q) for q in Path(p).iterdir() if q.is_file())
            if any(q.lower().endswith((".tif", ".tiff")) for q in inside):
                return []
            files.extend(q for q in inside if q.lower().endswith(IMAGE_SUFFIXES))
        elif p.lower().endswith(IMAGE_SUFFIXES):
            files.append(p)
        else:
            return []
    return files


def image_shapes(files: list[str], in_chans: int) -> list[tuple[int, int]]:
    """``(height, width)`` of every image, from the file headers (no pixels decoded), checked by every rank before
    any work: one line for a file that is not an image or whose band count the model cannot take (3-band models
    take any image, converted to RGB)."""
    from PIL import Image

    shapes = []
    for path in files:
        try:
            with Image.open(path) as im:
                bands, (w, h) = len(im.getbands()), im.size
        except OSError as err:
            raise harness.UserError(f"--input {path}: not a readable image ({err})") from None
        if in_chans != 3 and bands != in_chans:
            raise harness.UserError(f"--input {path}: {bands} band(s), but the model takes {in_chans}")
        shapes.append((int(h), int(w)))
    return shapes


def read_image(path: str, in_chans: int, size: int, scale: float) -> torch.Tensor:
    """One plain image as ``[C, size, size]`` float32: ``/ scale``, resized (bilinear, antialiased); not
    normalised."""
    import torch.nn.functional as F
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if in_chans == 3 else im, dtype=np.float32)
    except OSError as err:
        raise harness.UserError(f"--input {path}: not a readable image ({err})") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    x = torch.from_numpy(arr).permute(2, 0, 1)[None] / scale
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def embed_images(args: argparse.Namespace, files: list[str], model: torch.nn.Module, device: torch.device,
                 size: int, mean: torch.Tensor, std: torch.Tensor, pools: list[str], out: Path, rank: int,
                 world: int) -> dict:
    """One embedding per plain image (no georeferencing): the image (``--scale``d, normalised) resized to ``size``
    x ``size`` px, encoded at the res of its ``--gsd`` (one value: the images' ground metres per pixel) rescaled to
    the resized pixels (``util.gsd.rescale_res``). Rows: ``source`` (the file), ``height``/``width`` (the image's
    px), ``gsd``, ``gsd_read`` (metres per pixel shown to the model), ``res``, empty geometry.

    As for rasters: the images are cut into blocks (``--batch_size`` images each, one forward), the blocks are
    sharded over ranks and kept in ``<output>.blocks/`` (:class:`BlockStore`: a killed run started again with the
    same flags computes only the blocks it had not finished); rank 0 writes the output once, complete."""
    from inference.geoparquet import EMBEDDING_PREFIX, write_geoparquet
    from util.gsd import reference_gsd_factor, rescale_res, window_res

    if args.gsd is None or len(args.gsd) != 1:
        raise harness.UserError(f"--input {' '.join(args.input)}: plain images (no georeferencing) need --gsd with "
                                f"one value, their metres per pixel")
    if args.dense is not None:
        raise harness.UserError("--dense: needs georeferenced rasters; plain images have no grid to write it on")
    gsd = float(args.gsd[0])
    reference = float(args.reference_gsd or gsd)
    in_chans = int(mean.numel())
    shapes = image_shapes(files, in_chans)
    sides = [math.sqrt(h * w) for h, w in shapes]  # the ground side of each image, in its own pixels
    res = [rescale_res(window_res(size, size, args.base_resolution) * reference_gsd_factor(gsd, reference), side,
                       size) for side in sides]
    per = int(args.batch_size)
    plan = [Block(0, 0, b) for b in range(math.ceil(len(files) / per))]  # block b: images [b * per, (b + 1) * per)
    settings = run_settings(args, size, pools, mean, std, gsd=[gsd], reference_gsd=reference, images=len(files),
                            images_per_block=per, blocks=len(plan))
    store = BlockStore(out.parent / f"{out.name}.blocks")
    open_store(store, settings, args.overwrite, len(plan), f"blocks of {per} images")

    computed = skipped = 0
    for block in shard(plan, rank, world):
        if store.done(block):
            skipped += 1
            continue
        index = list(range(block.row * per, min(len(files), (block.row + 1) * per)))
        images = torch.stack([(read_image(files[i], in_chans, size, args.scale) - mean[:, None, None])
                              / std[:, None, None] for i in index])
        vecs = embed_batch(model, images.to(device), torch.tensor([res[i] for i in index], dtype=torch.float32)
                           .to(device), pools)
        store.save(block, {"index": np.asarray(index, dtype=np.int64), **{f"vec_{k}": v for k, v in vecs.items()}})
        computed += 1
    dist_util.barrier()
    n = 0
    if rank == 0:
        parts = [store.load(block) for block in plan]
        index = np.concatenate([part["index"] for part in parts]).tolist()
        cols = {"source": [files[i] for i in index], "tile": index, "row": [0] * len(index), "col": [0] * len(index),
                "height": [shapes[i][0] for i in index], "width": [shapes[i][1] for i in index],
                "gsd": [gsd] * len(index), "gsd_read": [gsd * sides[i] / size for i in index],
                "res": [float(res[i]) for i in index], "valid_fraction": [1.0] * len(index),
                "footprint_wgs84": [None] * len(index)}
        write_geoparquet(out, cols, [None] * len(index), None,
                         {f"{EMBEDDING_PREFIX}{p}": np.concatenate([part[f"vec_{p}"] for part in parts])
                          for p in pools}, metadata=settings)
        store.remove()
        n = len(index)
        print(f"wrote {n} image embeddings (no georeferencing) to {out}")
    dist_util.cleanup()
    return {"output": str(out), "windows": n, "computed_blocks": computed, "skipped_blocks": skipped, "dense": []}


def run_settings(args: argparse.Namespace, size: int, pools: list[str], mean: torch.Tensor, std: torch.Tensor,
                 **more: Any) -> dict:
    """The settings a block store (and the output's metadata) records: what the embeddings depend on; a resumed
    run must match them (``open_store``). ``more``: the input-specific ones."""
    ck = os.stat(args.checkpoint_path) if os.path.isfile(args.checkpoint_path) else None
    return {"checkpoint": os.path.abspath(args.checkpoint_path),  # another file there must not resume blocks
            "checkpoint_stat": [ck.st_size, ck.st_mtime_ns] if ck else None,
            "input": [str(s) for s in args.input], "size": size, "pool": pools, "mean": mean.tolist(),
            "std": std.tolist(), "base_resolution": args.base_resolution, **more}


# ----------------------------------------------------------------------------------------------------- main
def open_scenes(args: argparse.Namespace, source: Any, size: int, reader_kw: dict, in_chans: int, saved_args: dict,
                label: str) -> tuple[list, list[float], float]:
    """``(scene per GSD, GSDs, reference GSD)``: the files checked on their own grid (CRS, bands, dtype, upsampling
    for each ``--gsd``), then read on the grid of each GSD (default: the finest the files have)."""
    native = open_scene(source, None, size, **reader_kw)  # the files' own grid: CRS, bands, finest GSD
    check_scene(native, in_chans, label)
    check_dtype(native, saved_args, label, ignore=args.ignore_dtype)
    finest = native_gsd(native)
    gsds = [float(g) for g in (args.gsd or [round(finest, 6)])]
    check_upsampling(gsds, finest, args.no_upsample)
    reference = float(args.reference_gsd or min(gsds))
    scenes = [open_scene(source, None if args.gsd is None else g, size, reference_gsd=reference, **reader_kw)
              for g in gsds]
    return scenes, gsds, reference


def plan_windows(args: argparse.Namespace, scenes: list, gsds: list[float], size: int, stride: int, patch: int,
                 label: str) -> tuple[dict[Block, list], list[Path]]:
    """``(blocks, dense files)``: every block (a row of windows) of every GSD with its windows, and the ``--dense``
    GeoTIFF of each GSD (checked: one raster, a stride on the patch grid, not there unless ``--overwrite``)."""
    plan: dict[Block, list] = {}
    for gi, ds in enumerate(scenes):
        windows = window_grid(ds.tile_shapes, size, stride)
        if args.dense is not None:  # origins on the patch grid: window tokens fall on whole dense cells
            windows = list(dict.fromkeys((t, r - r % patch, c - c % patch) for t, r, c in windows))
        plan.update(blocks_of(windows, gi))
    dense = dense_paths(args.dense, gsds) if args.dense is not None else []
    if dense:
        if len(scenes[0].tile_shapes) > 1:
            raise harness.UserError(f"--dense: --input {label} has {len(scenes[0].tile_shapes)} rasters; --dense "
                                    f"writes the grid of one raster: give one (merge the tiles first)")
        if stride % patch:
            raise harness.UserError(f"--stride {stride}: --dense needs a multiple of the model's patch {patch}")
        for d in dense:
            if d.exists() and not args.overwrite:
                raise harness.UserError(f"--dense {d} exists; pass --overwrite to replace it (or choose another name)")
    if not plan:
        smallest = min(min(h, w) for ds in scenes for h, w in ds.tile_shapes)
        raise harness.UserError(f"--input {label}: no {size} px window fits (smallest read grid side {smallest} px); "
                                f"use a smaller --input_size, a finer --gsd or --mosaic")
    return plan, dense


def embed_blocks(blocks: list[Block], plan: dict[Block, list], scenes: list, store: BlockStore,
                 model: torch.nn.Module, device: torch.device, size: int, mean: torch.Tensor, std: torch.Tensor,
                 pools: list[str], dense: bool, args: argparse.Namespace) -> tuple[int, int]:
    """Embed and save the ``blocks`` not yet in ``store`` (per window: the pools, the patch tokens with ``dense``,
    ``gsd_read``, ``valid_fraction``, ``transform``, ``res``); returns ``(computed, skipped)``."""
    computed = skipped = 0
    wanted = pools + ["patch"] * bool(dense)
    for block in blocks:
        if store.done(block):
            skipped += 1
            continue
        ds = scenes[block.gsd_index]
        vecs: dict[str, list] = {p: [] for p in wanted}
        cols: dict[str, list] = {"gsd_read": [], "valid_fraction": [], "transform": [], "res": []}
        for chunk in batches(plan[block], args.batch_size):
            images, res, meta = _window_rows(ds, list(chunk), size, args.base_resolution, mean, std)
            for k, v in embed_batch(model, images.to(device), res.to(device), wanted).items():
                vecs[k].append(v)
            for k in meta:
                cols[k].extend(meta[k])
            cols["res"].extend(res.tolist())
        windows = np.asarray(plan[block], dtype=np.int64)
        store.save(block, {"windows": windows, **{k: np.asarray(v) for k, v in cols.items()},
                           **{f"vec_{k}": np.concatenate(v) for k, v in vecs.items()}})
        computed += 1
    return computed, skipped


def main(args: argparse.Namespace) -> dict:
    """Embed every window; returns ``{"output", "windows", "computed_blocks", "skipped_blocks"}``."""
    device, rank, world = start(args)  # device, process group, GDAL cache cap, flag checks
    out = check_output(args)
    source = expand_inputs(args.input, args.glob, IMAGE_SUFFIXES)
    label = " ".join(args.input)
    images = image_files(source)

    model, saved_args = load_encoder(args.checkpoint_path)
    model = model.to(device)
    patch = int(model.patch_embed.patch_size[0])
    in_chans = int(model.patch_embed.proj.weight.shape[1])
    size = int(args.input_size or trained_size(model, saved_args))
    if size % patch:
        raise harness.UserError(f"--input_size {size}: not a multiple of the model's patch {patch}")
    stride = int(args.stride or size)
    data = {} if exported_metadata(args.checkpoint_path) else training_data(args.checkpoint_path, saved_args)
    args.scale, *stats = input_scaling(args, saved_args, data, in_chans)  # as trained, unless flags say otherwise
    mean, std = (torch.tensor(v) for v in stats)
    pools = [p for p in POOLS if p in args.pool]

    if images:
        return embed_images(args, images, model, device, size, mean, std, pools, out, rank, world)
    reader_kw = dict(band_files=args.band_files, bands=trained_bands(args, data), scene_glob=args.scene_glob,
                     glob=args.glob, crs=args.crs, nodata=args.nodata, scale=args.scale, resampling=args.resampling,
                     mosaic=args.mosaic)
    scenes, gsds, reference = open_scenes(args, source, size, reader_kw, in_chans, saved_args, label)
    crs = str(scenes[0].tile_index["crs"].iloc[0])
    plan, dense = plan_windows(args, scenes, gsds, size, stride, patch, label)
    settings = run_settings(args, size, pools, mean, std, gsd=gsds, stride=stride, reference_gsd=reference,
                            reader=dict(reader_kw), blocks=len(plan), dense=[str(d) for d in dense])
    store = BlockStore(out.parent / f"{out.name}.blocks")
    open_store(store, settings, args.overwrite, len(plan), "window rows")
    computed, skipped = embed_blocks(shard(sorted(plan), rank, world), plan, scenes, store, model, device, size,
                                     mean, std, pools, bool(dense), args)
    dist_util.barrier()
    n = 0
    if rank == 0:
        n = assemble(out, store, sorted(plan), scenes, gsds, size, crs, pools, settings)
        for gi, path in enumerate(dense):
            write_dense(path, store, [b for b in sorted(plan) if b.gsd_index == gi], scenes[gi], patch, crs)
        store.remove()
        print(f"wrote {n} window embeddings at {len(gsds)} GSD(s) to {out}"
              + "".join(f"; patch tokens to {d}" for d in dense))
    dist_util.cleanup()
    return {"output": str(out), "windows": n, "computed_blocks": computed, "skipped_blocks": skipped,
            "dense": [str(d) for d in dense]}


def write_dense(path: Path, store: BlockStore, blocks: list[Block], ds, patch: int, crs: str) -> None:
    """The patch tokens of one GSD's blocks as a float32 GeoTIFF of D bands on the read grid of tile 0 scaled by
    ``patch`` (cell ``(i, j)`` = read-grid pixels ``[i*p, (i+1)*p) x [j*p, (j+1)*p)``), written block by block
    (one block's tokens in memory) to a temporary file renamed into place when complete; where windows overlap the
    later one (row, then column order) wins."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    from util.io import atomic_write

    h, w = ds.tile_shapes[0]
    height, width = h // patch, w // patch
    dim = int(store.load(blocks[0])["vec_patch"].shape[-1])
    profile = {"driver": "GTiff", "width": width, "height": height, "count": dim, "dtype": "float32", "crs": crs,
               "transform": Affine(*ds.tile_index["transform"].iloc[0][:6]) @ Affine.scale(patch),
               "compress": "deflate", "predictor": 3, "interleave": "pixel"}
    if min(width, height) >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)

    def write(tmp: str) -> None:
        with rasterio.open(tmp, "w", **profile) as dst:
            for block in blocks:
                part = store.load(block)
                for (_, r, c), tokens in zip(part["windows"].tolist(), part["vec_patch"]):
                    g = tokens.shape[0]
                    dst.write(np.moveaxis(tokens, -1, 0), window=Window(c // patch, r // patch, g, g))

    atomic_write(path, write, by_name=True)


ROWS_PER_GROUP = 4096  # GeoParquet rows assembled in memory at a time (one Parquet row group)


def footprint_bounds(store: BlockStore, blocks: list[Block], size: int) -> list[float]:
    """``[xmin, ymin, xmax, ymax]`` of the ``size`` px footprints of every window of ``blocks`` (from each block
    file's ``transform`` array only; corners as :func:`assemble` computes them)."""
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for block in blocks:
        with np.load(store.path(block), allow_pickle=False) as z:
            a, b, c, d, e, f = np.asarray(z["transform"], dtype=np.float64).T[:6]
        for u, v in ((0, 0), (size, 0), (size, size), (0, size)):
            xy = np.stack([u * a + v * b + c, u * d + v * e + f])
            lo, hi = np.minimum(lo, xy.min(1)), np.maximum(hi, xy.max(1))
    return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]


def assemble(out: Path, store: BlockStore, blocks: list[Block], scenes: list, gsds: list[float], size: int,
             crs: str, pools: list[str], settings: dict) -> int:
    """Write the GeoParquet file from every finished block (in plan order), streamed: blocks are read until
    :data:`ROWS_PER_GROUP` rows are gathered, written as one row group and dropped, so memory holds one group
    (not the file, whose rows grow with the window count); returns the row count."""
    from affine import Affine
    from shapely.geometry import Polygon
    import shapely
    from pyproj import Transformer

    from inference.geoparquet import EMBEDDING_PREFIX, write_geoparquet_parts

    to_wgs84 = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform
    count = 0

    def groups():
        nonlocal count
        cols: dict[str, list] = {}
        for i, block in enumerate(blocks):
            if not cols:  # a new group
                cols = {k: [] for k in ("source", "tile", "row", "col", "height", "width", "gsd", "gsd_read", "res",
                                        "valid_fraction")}
                geoms, vecs = [], {p: [] for p in pools}
            part = store.load(block)
            ds = scenes[block.gsd_index]
            for j, (t, r, c) in enumerate(part["windows"].tolist()):
                a = Affine(*part["transform"][j])
                geoms.append(Polygon([a @ (u, v) for u, v in ((0, 0), (size, 0), (size, size), (0, size))]))
                cols["source"].append(str(ds.tile_index["path"].iloc[t]))
                for k, v in (("tile", t), ("row", r), ("col", c), ("height", size), ("width", size)):
                    cols[k].append(int(v))
                cols["gsd"].append(gsds[block.gsd_index])
                for k in ("gsd_read", "res", "valid_fraction"):
                    cols[k].append(float(part[k][j]))
            for p in pools:
                vecs[p].append(part[f"vec_{p}"])
            if len(geoms) >= ROWS_PER_GROUP or i == len(blocks) - 1:
                cols["footprint_wgs84"] = shapely.to_wkt(shapely.transform(np.asarray(geoms, dtype=object), to_wgs84,
                                                                           interleaved=False)).tolist()
                count += len(geoms)
                yield cols, geoms, {f"{EMBEDDING_PREFIX}{p}": np.concatenate(v) for p, v in vecs.items()}
                cols = {}

    write_geoparquet_parts(out, groups(), crs, ["Polygon"], footprint_bounds(store, blocks, size), settings)
    return count


if __name__ == "__main__":
    harness.run(main, get_args_parser(), interrupted="the finished window rows are kept in <--output>.blocks/; rerun "
                                                     "the same command to resume there")
