"""Semantic segmentation with a Scale-MAE encoder + UPerNet (the paper's SpaceNet v1 building protocol).

SpaceNet-style data (GeoTIFF tiles + GeoJSON building footprints), one GPU:
    python main_segment.py --config config/seg_spacenet.yaml --data_root /data/spacenet1 \
        --checkpoint_path scalemae-vitlarge-800.pth --model vit_large_patch16 --input_size 224 --epochs 50
8 GPUs:            torchrun --nproc_per_node=8 main_segment.py ... (SyncBatchNorm in the heads)
Evaluate only:     python main_segment.py --eval --resume output_dir/checkpoint-latest.pth --config ... \
                       --eval_scales 0.5 0.75 1.0 --save_predictions --polygonize --overlays
CPU demo:          make demo-seg

Model: ``models_seg.build_segmentation_model(--model)``: the encoder's block outputs ``--out_indices`` (default:
ViT-L 7 11 15 23, ViT-B 3 5 7 11) with the per-sample GSD embedding -> 1/4..1/32 pyramid -> UPerNet (+ auxiliary
FCN head on 1/16 with ``--aux_weight``). Loss: cross-entropy ignoring ``data.ignore_index`` (+ ``--dice_weight`` x
Dice). AdamW with layer-wise lr decay (``--layer_decay``) on the encoder; neck and heads at the full rate.

Resolution: a training window of ``data.size`` px shown at ``--input_size`` px gets ``util.gsd.window_res`` (times
``util.gsd.reference_gsd_factor`` with ``data.reference_gsd``); evaluation at scale ``f`` resizes windows to
``f * size`` px and rescales res accordingly (``util.gsd.rescale_res``; the kNN table's GSD sweep, here on dense
labels).
``--crop_scale MIN MAX`` trains on random square crops of that fraction of the window, resized to ``--input_size``,
with the res of the crop (Scale-MAE's multiscale idea as a segmentation augmentation).

Outputs in ``--output_dir``: checkpoints, ``log.txt``, ``config.yaml``, ``seg-epochNNNN.{md,json,png}`` (per-scale
IoU table), ``predictions/`` (``--save_predictions``: GeoTIFFs with the source transform/CRS, ``--polygonize``:
GeoPackages, ``--overlays``: PNGs); TensorBoard in ``--log_dir``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import harness
import models_seg
import models_vit
from engine_segment import evaluate, scale_key, train_one_epoch
from dataloaders.seeding import ResumableSampler
from harness.pretrained import choose_encoder, read_start, resolve_model_name
from util import dist as dist_util
from util.accel import add_compile_args, maybe_compile
from util.amp import AmpConfig
from util.checkpoint import args_to_plain
from util.lr_decay import param_groups_lrd, param_groups_weight_decay

WRITER = "main_segment"
DEFAULT_MODEL = "vit_large_patch16"
DEFAULT_CONFIG = "seg_spacenet.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Scale-MAE semantic segmentation (UPerNet)", add_help=True)

    g = p.add_argument_group("schedule")
    harness.add_schedule_args(g, batch_size=8, epochs=50, blr=1.6e-3, warmup_epochs=1.0,
                              batch_note=" (>= 2: BatchNorm in the heads)", blr_note=" (1e-4 at batch 16)")
    g.add_argument("--layer_decay", type=float, default=0.65,
                   help="layer-wise lr decay of the encoder, 1 = off (default 0.65)")
    add_compile_args(g)
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute encoder blocks in backward")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"encoder: {', '.join(models_vit.MODELS)} (MAE names map to their encoder); default: the "
                        f"checkpoint's architecture, else {DEFAULT_MODEL}")
    g.add_argument("--checkpoint_path", default=None,
                   help="pretrained Scale-MAE weights (pretraining checkpoint, the release, or an exported encoder)")
    g.add_argument("--allow_random_init", action="store_true",
                   help="train without --checkpoint_path (randomly initialised encoder)")
    g.add_argument("--input_size", default=224, type=int,
                   help="model input side (px), a multiple of the patch (default 224)")
    g.add_argument("--out_indices", nargs=4, type=int, default=None, metavar="BLOCK",
                   help="encoder blocks feeding the pyramid (default: ViT-L 7 11 15 23, ViT-B 3 5 7 11)")
    g.add_argument("--head_channels", default=512, type=int, help="UPerNet width (default 512)")
    g.add_argument("--aux_channels", default=256, type=int,
                   help="auxiliary FCN head width, 0 = no auxiliary head (default 256)")
    g.add_argument("--aux_weight", default=0.4, type=float, help="auxiliary loss weight (default 0.4)")
    g.add_argument("--dice_weight", default=0.0, type=float,
                   help="Dice loss weight added to the cross-entropy (default 0: off)")
    g.add_argument("--sync_bn", action="store_true", default=True,
                   help="SyncBatchNorm in the neck and heads under DDP on CUDA (default on)")
    g.add_argument("--no_sync_bn", action="store_false", dest="sync_bn")

    g = harness.add_data_args(p, default_config=DEFAULT_CONFIG, config_help="segmentation data config (YAML)")
    g.add_argument("--base_resolution", default=1.0, type=float,
                   help="res of a window shown at its native pixel count, see the module docstring (default 1.0)")
    g.add_argument("--crop_scale", nargs=2, type=float, default=[1.0, 1.0], metavar=("MIN", "MAX"),
                   help="scale augmentation: train on a random square crop of MIN..MAX of the window side, resized "
                        "to --input_size (res follows the crop); default 1 1 = off")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_scales", nargs="+", type=float, default=[1.0],
                   help="evaluate with windows resized to these fractions of their side, e.g. 0.5 0.75 1.0 "
                        "(default 1.0)")
    g.add_argument("--eval_freq", default=1, type=int, help="evaluate every n epochs, and after the last (default 1)")
    g.add_argument("--eval_batch_size", default=None, type=int, help="default: --batch_size")
    g.add_argument("--object_f1", action="store_true", help="SpaceNet-style object F1 at IoU 0.5 (class 1)")
    g.add_argument("--save_predictions", action="store_true",
                   help="write the final evaluation's predictions (first --eval_scales entry) as GeoTIFFs")
    g.add_argument("--polygonize", action="store_true", help="also write the predictions as GeoPackage polygons")
    g.add_argument("--simplify", default=0.0, type=float, help="polygon simplification tolerance (CRS units)")
    g.add_argument("--overlays", action="store_true", help="also write overlay PNGs (prediction + label outline)")
    g.add_argument("--eval", action="store_true", help="evaluate (--resume or --checkpoint_path) and exit")
    g.add_argument("--predict", nargs=argparse.REMAINDER, default=None, metavar="RASTER",
                   help="not done here: segmentation maps of rasters are main_predict.py's; prints its command")

    harness.add_run_args(p, output_dir_default="./output_dir/segment",
                         output_dir_help="checkpoints, log.txt, config.yaml, IoU tables, predictions",
                         resume_help="segmentation checkpoint of this script to resume from",
                         checkpoint_interval=10)
    harness.add_distributed_args(p)
    return p


# ---------------------------------------------------------------------------------------------------- checks
def validate_args(args: argparse.Namespace) -> None:
    """Start-up checks of the flags (nothing is read or written yet); each failure is one line."""
    if args.predict is not None:
        raise harness.UserError(f"main_segment.py does not predict rasters; segmentation maps of rasters (sliding "
                                f"windows, COG output) come from its sibling launcher: {predict_command(args)}")
    harness.require(args.batch_size >= 2,
                    f"--batch_size {args.batch_size}: needs >= 2 per process (BatchNorm in the heads)")
    harness.check_positive(args, "epochs", "accum_iter", "eval_freq", "input_size", "head_channels",
                           "checkpoint_interval", "print_freq", "blr", "lr", "layer_decay", "base_resolution",
                           "eval_scales", "eval_batch_size", "aux_weight", "dice_weight", "aux_channels",
                           "warmup_epochs", "simplify", "weight_decay", "min_lr", "clip_grad", "num_workers",
                           "save_every_steps",
                           allow_zero=("aux_weight", "dice_weight", "aux_channels", "warmup_epochs", "simplify",
                                       "weight_decay", "min_lr", "clip_grad", "num_workers", "save_every_steps"))
    harness.require(args.layer_decay <= 1, f"--layer_decay {args.layer_decay}: must be in (0, 1]")
    harness.require(all(s <= 4 for s in args.eval_scales), f"--eval_scales {args.eval_scales}: must be in (0, 4]")
    harness.require(0 < args.crop_scale[0] <= args.crop_scale[1] <= 1,
                    f"--crop_scale {args.crop_scale[0]:g} {args.crop_scale[1]:g}: need 0 < MIN <= MAX <= 1")
    if args.model is not None:
        resolve_model_name(args.model, quiet=True)


# ------------------------------------------------------------------------------------------------------ model
def build_model(args: argparse.Namespace, num_classes: int, in_chans: int,
                pretrained: Optional[Mapping[str, torch.Tensor]]) -> models_seg.SegmentationModel:
    """The segmentation model, with the pretrained encoder weights ``pretrained`` (None: random or resumed)."""
    try:
        model = models_seg.build_segmentation_model(
            args.model, num_classes, img_size=args.input_size, in_chans=in_chans, out_indices=args.out_indices,
            channels=args.head_channels, aux_channels=args.aux_channels or None)
    except ValueError as err:
        raise harness.UserError(f"cannot build the segmentation model: {err}") from None
    harness.require(args.input_size % model.patch_size == 0 and args.input_size >= 2 * model.patch_size,
                    f"--input_size {args.input_size}: must be a multiple of the patch size {model.patch_size} "
                    f"and at least {2 * model.patch_size}")
    if pretrained is not None:
        try:
            report = models_seg.load_pretrained_encoder(model, pretrained)
        except ValueError as err:
            raise harness.UserError(f"--checkpoint_path {args.checkpoint_path}: {err}") from None
        heads = [k for k in report.missing_keys if k.startswith(models_seg.HEAD_PREFIXES)]
        other = [k for k in report.missing_keys if k not in heads]
        print(f"loaded encoder from {args.checkpoint_path}: {len(heads)} neck/head tensors newly initialised"
              f"{f', also missing {other}' if other else ''}; {len(report.unexpected_keys)} pretraining-only "
              f"tensors unused")
    if args.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    return model


def build_param_groups(model: models_seg.SegmentationModel, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Encoder: layer-wise decay groups (``util.lr_decay.param_groups_lrd``, names prefixed ``backbone.``);
    neck and heads: one decay / no-decay pair at lr scale 1."""
    groups = param_groups_lrd(model.backbone, args.weight_decay, no_weight_decay_list=("pos_embed", "cls_token"),
                              layer_decay=args.layer_decay)
    for g in groups:
        g["name"] = f"backbone_{g['name']}"
        g["param_names"] = [f"backbone.{n}" for n in g["param_names"]]
    heads = nn.ModuleDict({n: m for n, m in model.named_children() if n != "backbone"})
    for g in param_groups_weight_decay(heads, args.weight_decay):
        g["name"] = f"heads_{g['name']}"
        groups.append(g)
    return [g for g in groups if g["params"]]


RESUME_CHECK = "--model, --out_indices, --head_channels, --aux_channels and the classes"


def load_resumed(model: nn.Module, resumed: Optional[Mapping], resume: Optional[str], classes: list,
                 config: str) -> float:
    """The resumed run's weights (strict; its unused ``backbone.pos_embed`` may differ in size: evaluate at any
    ``--input_size``), after checking its classes. Returns its best mIoU (0 when not resuming)."""
    if resumed is None:
        return 0.0
    if resumed.get("classes") not in (None, classes):
        raise harness.UserError(f"--resume {resume} was trained on classes {resumed['classes']}, but --config "
                                f"{config} gives {classes}")
    harness.load_resumed_weights(model, resumed["model"], f"--resume {resume}", check=RESUME_CHECK,
                                 unused=("backbone.pos_embed",))
    print(f"resumed model weights from {resume}")
    return float(resumed.get("best_miou", 0.0) or 0.0)


def make_writer(args: argparse.Namespace, out_dir: Path, val_ds, classes, ignore_index: int):
    """The prediction writer of the final evaluation (None unless an output is asked for)."""
    if not (args.save_predictions or args.polygonize or args.overlays):
        return None
    from util.seg_outputs import PredictionWriter

    src = val_ds.source
    return PredictionWriter(out_dir / "predictions", classes, src.paths, src.transforms, src.crs,
                            polygonize=args.polygonize, simplify=args.simplify, overlays=args.overlays,
                            ignore_index=ignore_index)


class SegEvaluation:
    """Per-scale IoU of ``model`` on the validation windows (``engine_segment.evaluate``), printed and saved as
    ``<tag>.{md,json,png}``; keeps the best mIoU at the first ``--eval_scales`` entry and the last result.
    ``model`` is the module that trains (set it again once wrapped in DDP)."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, val_ds, classes: list, out_dir: Path,
                 device: torch.device, best_miou: float) -> None:
        from dataloaders.segmentation import TileShardSampler, seg_collate

        self.args, self.model, self.val_ds, self.classes, self.out_dir = args, model, val_ds, classes, out_dir
        self.device, self.best_miou, self.last, self.patch = device, best_miou, {}, model.patch_size
        self.loader = DataLoader(val_ds, sampler=TileShardSampler(val_ds.windows, dist_util.get_world_size(),
                                                                  dist_util.get_rank()),
                                 batch_size=args.eval_batch_size or args.batch_size, num_workers=args.num_workers,
                                 pin_memory=args.pin_mem and device.type == "cuda", collate_fn=seg_collate)

    def __call__(self, tag: str, final: bool) -> dict[str, Any]:
        from util.seg_metrics import format_seg_table, save_seg_report

        args = self.args
        writer = make_writer(args, self.out_dir, self.val_ds, self.classes, args.ignore_index) if final else None
        self.last = evaluate(self.model, self.loader, self.device, args.eval_scales, self.classes, args.ignore_index,
                             AmpConfig(args.amp, self.device).dtype, 1 if args.object_f1 else None, writer,
                             self.patch, args.print_freq)
        if dist_util.is_main_process():
            print(format_seg_table(self.last))
            save_seg_report(self.last, self.out_dir, tag)
            if writer is not None:
                print(f"predictions written to {writer.out_dir} ({len(writer.written)} files on rank 0)")
        return self.last

    def after_epoch(self, epoch: int, log_writer: Any) -> dict[str, float]:
        """The evaluation of an epoch (every ``--eval_freq`` and the last; the last writes predictions): the log
        entries, and ``perf/miou_scale<s>`` in TensorBoard."""
        last = epoch + 1 == self.args.epochs
        if not (last or (epoch + 1) % self.args.eval_freq == 0):
            return {}
        result = self(f"seg-epoch{epoch + 1:04d}", final=last)
        first = result["scales"][scale_key(self.args.eval_scales[0])]
        self.best_miou = max(self.best_miou, first["miou"])
        if log_writer is not None:
            for key, r in result["scales"].items():
                log_writer.add_scalar(f"perf/miou_scale{key}", r["miou"], epoch)
        return {"test_miou": first["miou"], "test_pixel_acc": first["pixel_acc"],
                "test_mean_miou": result["mean"]["miou"], "best_miou": self.best_miou}


def train_loader(args: argparse.Namespace, train_ds, device: torch.device,
                 length: int) -> tuple[DataLoader, ResumableSampler]:
    """The training loader and its sampler (``set_epoch`` each epoch; it can resume mid-epoch); too few windows
    for a batch is an error."""
    from dataloaders.segmentation import seg_collate

    sampler = ResumableSampler(train_ds.make_sampler(dist_util.get_world_size(), dist_util.get_rank(), args.seed))
    loader = DataLoader(train_ds, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True, collate_fn=seg_collate)
    harness.require(len(loader) > 0, f"data.length {length} gives {len(sampler)} windows per process, "
                                     f"fewer than --batch_size {args.batch_size}")
    return loader, sampler


def predict_command(args: argparse.Namespace) -> str:
    """The ``main_predict.py`` command for ``main_segment.py --predict RASTER ... [its flags]``: the rasters as
    ``--input``, ``--resume``/``--output_dir`` from either side of ``--predict`` (placeholders when not given), the
    flags after the rasters kept as they are."""
    import shlex

    rest = list(args.predict)
    inputs = []
    while rest and not rest[0].startswith("-"):
        inputs.append(rest.pop(0))
    cmd = ["python", "main_predict.py", "--input", *(inputs or ["RASTER"])]
    given_after = {t.split("=")[0] for t in rest if t.startswith("--")}
    if "--resume" not in given_after:
        cmd += ["--resume", args.resume or "CHECKPOINT"]
    if "--output_dir" not in given_after:
        given = args.output_dir != get_args_parser().get_default("output_dir")
        cmd += ["--output_dir", args.output_dir if given else "OUTPUT_DIR"]
    return shlex.join(cmd + rest)


# ------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or ``--eval``); returns ``{"eval": last evaluation result, "best_miou", "history"}``."""
    from dataloaders.config import load_seg_config
    from dataloaders.segmentation import build_seg_datasets

    validate_args(args)
    harness.resolve_data_config(args, DEFAULT_CONFIG)
    device = harness.setup(args)
    out_dir = harness.prepare_output(args, training=not args.eval)
    resume, resumed, pretrained, pretrained_args = read_start(args, out_dir, WRITER)
    choose_encoder(args, resume, resumed, pretrained, pretrained_args, DEFAULT_MODEL, prefix="backbone.")

    # --- data
    cfg = load_seg_config(args.config, data_root=args.data_root, overrides=args.data_override)
    train_ds, val_ds, classes = build_seg_datasets(cfg, args.input_size, args.base_resolution, args.seed,
                                                   tuple(args.crop_scale))
    d = cfg["data"]
    args.ignore_index = d["ignore_index"]
    print(f"classes {classes}; train {len(train_ds.source.paths)} raster(s), {d['length']} windows of {d['size']} px "
          f"per epoch shown at {args.input_size} px; validation {len(val_ds.source.paths)} raster(s), "
          f"{len(val_ds.windows)} windows")

    # --- model, evaluation
    model = build_model(args, len(classes), len(d["mean"]), pretrained).to(device)
    best_miou = load_resumed(model, resumed, resume, classes, args.config)
    if args.distributed and args.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    model = maybe_compile(model, args)  # evaluation and training (under DDP below) share the wrapper
    scores = SegEvaluation(args, model, val_ds, classes, out_dir, device, best_miou)
    if args.eval:
        result = harness.evaluate_only(out_dir, args, cfg, lambda: scores("seg-eval", final=True), classes=classes)
        return {"eval": result, "best_miou": best_miou, "history": []}

    # --- optimizer, resumed training state
    optimizer, amp, start_step = harness.start_optimizer(build_param_groups(model_without_ddp, args), args, device,
                                                         resumed, resume, keep_names=True)
    if start_step is None:
        result = scores(f"seg-epoch{args.start_epoch:04d}", final=True)
        dist_util.cleanup()
        return {"eval": result, "best_miou": best_miou, "history": []}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {args.model} + UPerNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
          f"({n_train / 1e6:.2f} M trainable), blocks {list(model_without_ddp.out_indices)}; effective batch "
          f"{args.batch_size * args.accum_iter * dist_util.get_world_size()}; lr {args.lr:.3g}; layer decay "
          f"{args.layer_decay}")
    model = scores.model = harness.wrap_ddp(model, args, device)
    loader, sampler = train_loader(args, train_ds, device, d["length"])
    steps_per_epoch = len(loader)

    # --- the run starts: from here on the output folder describes it
    run = harness.TrainingRun(args, out_dir, WRITER, cfg, start_step=start_step, resumed=resumed, classes=classes,
                              train_data=train_ds)
    run.resume_sampler(sampler, args.batch_size)

    def train_epoch(epoch: int, stop: harness.StopRequest) -> dict[str, float]:
        sampler.set_epoch(epoch)
        train_ds.epoch = epoch
        return train_one_epoch(model, loader, optimizer, device, epoch, amp, args, run.log_writer,
                               on_finite_loss=run.keeper.verify, stop=stop, start_step=run.start_step,
                               on_step_end=run.step_saver(epoch, steps_per_epoch))

    history = run.train(train_epoch, lambda epoch: {
        "model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        "scaler": amp.state_dict(), "args": args_to_plain(args), "best_miou": scores.best_miou, "classes": classes},
        evaluate=lambda epoch: scores.after_epoch(epoch, run.log_writer), mid_epoch_saves=True)
    return {"eval": scores.last, "best_miou": scores.best_miou, "history": history}


if __name__ == "__main__":
    harness.run(main, get_args_parser())
