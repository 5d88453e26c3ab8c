"""Linear probing (frozen encoder + BatchNorm/Linear head) or full finetuning (``--finetune``) of a Scale-MAE encoder.

Linear probe, one process:  python main_linprobe.py --checkpoint_path scalemae-vitlarge-800.pth \
                                --config config/resisc.yaml --eval_dataset resisc --eval_path <root>/val.txt
Finetune, 8 GPUs:           torchrun --nproc_per_node=8 main_linprobe.py --finetune --checkpoint_path ckpt.pth ...
Evaluate a probe:           python main_linprobe.py --eval --resume output_dir/checkpoint-latest.pth ...
CPU demo (built-in data):   python main_linprobe.py --config config/demo.yaml --eval_dataset demo \
                                --model vit_tiny_patch16 --input_size 64 --eval_scale 64 --device cpu --epochs 2

Model: ``models_vit.<--model>(img_size=input_size, num_classes=nb_classes, global_pool=...)``; the classifier is
replaced by ``Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear(D, C))`` (keys ``head.0.*``, ``head.1.*``),
with ``head.1.weight ~ trunc_normal(std=0.01)`` unless ``--eval``. Linear probe: only ``head.*`` trains (AdamW,
betas (0.9, 0.95)); finetune: everything except the unused ``pos_embed`` trains, with layer-wise lr decay
``layer_decay ** (depth + 1 - layer_id)`` and ``--linear_layer_scale`` on the head-weight group.

Resolution (``res``): training samples carry ``util.gsd.crop_res(crop_side, input_size, base_resolution)`` from the
random resized crop (area fraction in [scale_min, scale_max]); validation uses one ``util.gsd.eval_res`` for every
sample (``--eval_base_resolution``, ``--eval_gsd``, ``--eval_reference_resolution``, ``--eval_scale``). These are the
original formulas (``util/gsd.py``); with the original defaults they disagree (train about 1.8-2.5, eval 1.0), so
both are printed and a warning is given when they differ by more than 10 %.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import harness
import models_vit
from engine_finetune import evaluate, train_one_epoch
from dataloaders.seeding import ResumableSampler
from harness.pretrained import choose_encoder, read_pretrained, read_start, resolve_model_name
from util import dist as dist_util
from util.accel import add_compile_args, maybe_compile
from util.amp import AmpConfig
from util.checkpoint import args_to_plain
from util.dist import ShardSampler
from util.gsd import crop_res, eval_res
from util.lr_decay import apply_linear_layer_scale, param_groups_lrd, param_groups_weight_decay
from util.weights import factory_patch_size

# Flags kept so that original command lines still parse; they change nothing (as in the original).
DEAD_FLAGS = {
    "drop_path": "never passed to the model (as in the original)",
    "target_size": "no reconstruction target in linear probing",
    "source_size": "no reconstruction target in linear probing",
    "mask_ratio": "no masking in linear probing",
    "norm_pix_loss": "no reconstruction loss in linear probing",
    "eval_only": "kNN evaluation lives in main_pretrain.py --eval_only",
    "dist_eval": "evaluation is always sharded over ranks, without duplicated samples",
    "wandb_id": "wandb is not used; see TensorBoard in --log_dir",
    "name": "wandb is not used; the run is named by --output_dir",
}

HEAD_NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")
WRITER = "main_linprobe"
DEFAULT_MODEL = "vit_large_patch16"
DEFAULT_CONFIG = "resisc.yaml"  # the training set without --config (data/resisc45/train-resisc.txt)


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Scale-MAE linear probing / finetuning", add_help=True)

    g = p.add_argument_group("schedule")
    harness.add_schedule_args(g, batch_size=64, epochs=400, blr=1e-3, warmup_epochs=0,
                              batch_note=" (times the config's oversample)")
    g.add_argument("--layer_decay", type=float, default=0.75,
                   help="layer-wise lr decay, --finetune only (default 0.75)")
    g.add_argument("--linear_layer_scale", type=float, default=1.0,
                   help="extra lr scale of the head-weight group, --finetune only (default 1.0)")
    add_compile_args(g)
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute encoder blocks in backward (--finetune only; a frozen encoder stores nothing)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, type=str,
                   help=f"encoder: {', '.join(models_vit.MODELS)}; an MAE name such as mae_vit_large_patch16 is "
                        f"mapped to its encoder (default: the architecture of --checkpoint_path / the resumed "
                        f"checkpoint, else vit_large_patch16)")
    g.add_argument("--input_size", default=224, type=int, help="training image side, px (default 224)")
    g.add_argument("--nb_classes", default=None, type=int, help="classifier size (default: from the dataset)")
    g.add_argument("--global_pool", action="store_true", help="mean of patch tokens + fc_norm instead of cls token")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token (default)")
    g.set_defaults(global_pool=False)
    g.add_argument("--finetune", action="store_true", help="train the whole encoder instead of a linear probe")
    g.add_argument("--checkpoint_path", default=None, type=str,
                   help="pretrained weights: pretraining checkpoint (ours or the original release), encoder file "
                        "(.pth/.safetensors from tools/export_encoder.py); path or URL")
    g.add_argument("--allow_random_init", action="store_true",
                   help="train or --eval without --checkpoint_path / --resume (a randomly initialised encoder)")

    g = harness.add_data_args(p, default_config=DEFAULT_CONFIG, root_also=" and --eval_path",
                              config_help="YAML data config of the TRAIN set (data/resisc45/train-resisc.txt)")
    g.add_argument("--scale_min", default=0.5, type=float, help="random resized crop: min area fraction (default 0.5)")
    g.add_argument("--scale_max", default=1.0, type=float, help="random resized crop: max area fraction (default 1.0)")
    g.add_argument("--base_resolution", default=2.5, type=float,
                   help="train res = (crop - 1) / input_size * base_resolution (default 2.5)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", default=None, type=str,
                   help="validation set id (its normalisation): resisc, mlrsnet, airound, cvbrct, eurosat, optimal-31, "
                        "whu-rs19, ucmerced, fmow, demo (default: the config's data.type)")
    g.add_argument("--eval_path", default=None, type=str,
                   help="validation ImageFolder root or split-list file; training images in it are left out "
                        "(default: val-<name>.txt / val.txt / val/ next to the training source, else a seeded "
                        "10%% per-class split of it, said at start-up)")
    g.add_argument("--eval_scale", default=224, type=int,
                   help="validation image side (fmow: Resize+CenterCrop; others with --eval_resize) (default 224)")
    g.add_argument("--eval_resize", action="store_true",
                   help="Resize+CenterCrop every validation set to --eval_scale (the original only did so for fmow)")
    g.add_argument("--eval_gsd", action="store_true",
                   help="eval res = eval_base_resolution * eval_reference_resolution / eval_scale")
    g.add_argument("--eval_base_resolution", default=1.0, type=float, help="validation res (default 1.0)")
    g.add_argument("--eval_reference_resolution", default=224, type=float, help="see --eval_gsd (default 224)")
    g.add_argument("--eval", action="store_true", help="evaluate (the resumed model) and exit")

    harness.add_run_args(p, output_dir_default=None,
                         output_dir_help="checkpoints, log.txt, config.yaml: ./output_dir/linprobe, or "
                                         "./output_dir/finetune with --finetune; never the pretraining folder",
                         resume_help="checkpoint of this script to resume from (path or URL)",
                         checkpoint_interval=20)

    harness.add_distributed_args(p)

    g = p.add_argument_group("accepted for compatibility, no effect")
    g.add_argument("--drop_path", type=float, default=0.1, help="ignored, as in the original")
    g.add_argument("--target_size", nargs="*", type=int, default=[224])
    g.add_argument("--source_size", nargs="*", type=int, default=[224])
    g.add_argument("--mask_ratio", default=0.75, type=float)
    g.add_argument("--norm_pix_loss", action="store_true")
    g.add_argument("--eval_only", action="store_true")
    g.add_argument("--dist_eval", action="store_true")
    g.add_argument("--wandb_id", default=None, type=str)
    g.add_argument("--name", default="", type=str)
    return p


# ---------------------------------------------------------------------------------------------- setup helpers
def eval_resolution(args: argparse.Namespace) -> float:
    """The validation res (the original's formula, ``util.gsd.eval_res``)."""
    return eval_res(args.eval_scale, args.eval_base_resolution, args.eval_gsd, args.eval_reference_resolution)


def train_resolution_range(args: argparse.Namespace) -> tuple[float, float, float]:
    """(min, median, max) of the training res for images of side ``input_size`` (crop side = sqrt(area) * side)."""
    n = args.input_size

    def res(area: float) -> float:
        side = max(1, round(math.sqrt(area) * n))
        return crop_res(side, n, args.base_resolution)

    return res(args.scale_min), res((args.scale_min + args.scale_max) / 2), res(args.scale_max)


def report_resolutions(args: argparse.Namespace) -> dict[str, float]:
    lo, mid, hi = train_resolution_range(args)
    ev = eval_resolution(args)
    print(f"res: train {lo:.3f} .. {hi:.3f} (median {mid:.3f}) = (crop - 1) / {args.input_size} * "
          f"{args.base_resolution:g}; eval {ev:.3f}"
          + (f" = {args.eval_base_resolution:g} * {args.eval_reference_resolution:g} / {args.eval_scale}"
             if args.eval_gsd else f" = --eval_base_resolution"))
    if abs(ev - mid) > 0.1 * mid:
        print(f"WARNING: the eval res ({ev:.3f}) differs from the median train res ({mid:.3f}) by "
              f"{100 * abs(ev - mid) / mid:.0f} %: the encoder sees a different positional scale at test time. "
              f"To match, pass --eval_base_resolution {mid:.3g} (or --base_resolution "
              f"{args.base_resolution * ev / mid:.3g}). The original's defaults have this mismatch.")
    return {"train_res_min": lo, "train_res_median": mid, "train_res_max": hi, "eval_res": ev}


# ------------------------------------------------------------------------------------------------------ data
def _resolve_eval_path(args: argparse.Namespace) -> Optional[str]:
    """--eval_path; a relative path that does not exist from the working directory is taken under --data_root."""
    path = args.eval_path
    if not path:
        return None
    path = os.path.expanduser(path)
    if args.data_root and not os.path.isabs(path) and not os.path.exists(path):
        under_root = Path(args.data_root) / path
        return str(under_root) if under_root.exists() else path  # neither: report the path as typed
    return path


def default_eval_dataset(cfg: Optional[Mapping]) -> str:
    """The evaluation id matching the training config's data type (resisc when it is not one)."""
    from dataloaders.builders import EVAL_STATS

    kind = str(((cfg or {}).get("data") or {}).get("type", "")).lower()
    return kind if kind in EVAL_STATS or kind == "demo" else "resisc"


def build_datasets(args: argparse.Namespace) -> tuple[Optional[Dataset], Dataset, int, Optional[dict]]:
    """(train_ds or None with --eval and no config, val_ds, num_classes, config). Says where validation comes
    from; it never holds training images."""
    from dataloaders.builders import build_linprobe_datasets
    from dataloaders.config import load_config
    from dataloaders.errors import MissingDataError
    from dataloaders.scenes import warn_unseen_classes

    if args.eval and args.config is None and args.eval_path:
        from dataloaders.eval_sets import build_scene_dataset, eval_transform

        args.eval_dataset = args.eval_dataset or "resisc"
        eval_path = _resolve_eval_path(args)
        tf = eval_transform(args.eval_dataset, "linprobe", args.eval_scale, resize=args.eval_resize or None)
        val = build_scene_dataset(eval_path, args.eval_dataset, tf)
        print(f"--eval without --config: evaluating on {eval_path} alone ({len(val.class_to_idx)} classes)")
        return None, val, len(val.class_to_idx), None
    defaulted = args.config is None
    harness.resolve_data_config(args, default=DEFAULT_CONFIG)
    cfg = load_config(args.config, data_root=args.data_root, overrides=args.data_override)
    if args.eval_dataset is None:
        args.eval_dataset = default_eval_dataset(cfg)
    notes: list[str] = []
    try:
        train_ds, val_ds, num_classes = build_linprobe_datasets(
            cfg, args.eval_dataset, _resolve_eval_path(args), input_size=args.input_size, scale_min=args.scale_min,
            scale_max=args.scale_max, base_resolution=args.base_resolution, eval_scale=args.eval_scale,
            seed=args.seed, val_resize=True if args.eval_resize else None, report=notes)
    except MissingDataError as err:
        if not defaulted:
            raise
        raise harness.UserError(f"{err}: without --config the probe trains on NWPU-RESISC45 (config/"
                                f"{DEFAULT_CONFIG}: data/resisc45/train-resisc.txt, lists in splits/); pass --config "
                                f"for another dataset (e.g. --config config/fmow.yaml for the fMoW data linked as "
                                f"data/) or put RESISC-45 under data/resisc45") from None
    for line in notes:
        print(line)
    warn_unseen_classes(train_ds, val_ds, "the training set")
    print(f"data: {len(train_ds)} training images ({args.config}), {len(val_ds)} validation images "
          f"({args.eval_dataset} normalisation), {num_classes} classes")
    return train_ds, val_ds, num_classes, cfg


class ValCollate:
    """Stack validation images; when they differ in size (a user's own folder), area-resize each to
    ``--eval_scale`` first (stacking would fail; the original crashed)."""

    def __init__(self, scale: int) -> None:
        self.scale = int(scale)

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = [item[0] for item in batch]
        if any(img.shape != imgs[0].shape for img in imgs):
            imgs = [torch.nn.functional.interpolate(img[None], size=(self.scale, self.scale), mode="area")[0]
                    for img in imgs]
        return torch.stack(imgs), torch.as_tensor([int(item[1]) for item in batch])


# ----------------------------------------------------------------------------------------------------- model
def load_pretrained(model: models_vit.VisionTransformer, path: str,
                    state: Optional[Mapping[str, torch.Tensor]] = None) -> models_vit.LoadReport:
    """Load ``--checkpoint_path`` into the encoder, checking missing/unexpected keys exactly
    (``models_vit.load_mae_checkpoint``); a classifier of another layout in the file (e.g. a probe's
    ``head.0/1.*``) is ignored."""
    sd = dict(state) if state is not None else read_pretrained(path)[0]
    own = model.state_dict()
    foreign_head = [k for k in sd if k.startswith("head.") and k not in own]
    if foreign_head:
        print(f"ignoring the checkpoint's classifier tensors {foreign_head}")
        sd = {k: v for k, v in sd.items() if k not in foreign_head}
    try:
        report = models_vit.load_mae_checkpoint(model, sd)
    except ValueError as err:
        raise harness.UserError(f"--checkpoint_path {path}: {err}") from None
    print(f"loaded {path}: missing {report.missing_keys} (expected: the classifier, plus the unused pos_embed at "
          f"another input size); {len(report.unexpected_keys)} unused pretraining-only tensors (decoder etc.)")
    return report


def build_model(args: argparse.Namespace, num_classes: int, resuming: bool = False,
                pretrained: Optional[Mapping[str, torch.Tensor]] = None) -> models_vit.VisionTransformer:
    """Encoder + BatchNorm/Linear head; pretrained weights from ``--checkpoint_path`` unless resuming."""
    model = models_vit.MODELS[args.model or DEFAULT_MODEL](img_size=args.input_size, num_classes=num_classes,
                                                           global_pool=args.global_pool)
    if args.checkpoint_path and not resuming:
        load_pretrained(model, args.checkpoint_path, pretrained)
    elif not resuming:
        print("WARNING: no --checkpoint_path: the encoder is randomly initialised")
    if not args.eval:
        nn.init.trunc_normal_(model.head.weight, std=0.01)
    dim = model.head.in_features
    model.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), model.head)
    for name, param in model.named_parameters():
        if args.finetune:
            param.requires_grad = name != "pos_embed"
        else:
            param.requires_grad = name.startswith("head.")
    if args.grad_checkpointing:
        if args.finetune:
            model.set_grad_checkpointing(True)
        else:
            print("NOTE: --grad_checkpointing has no effect in a linear probe (the frozen encoder stores nothing)")
    return model


def build_param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Linear probe: head weight (decay) / head bias (no decay). Finetune: layer-wise decay groups, with
    ``--linear_layer_scale`` applied to the head-weight group."""
    if not args.finetune:
        return param_groups_weight_decay(model, args.weight_decay)
    groups = param_groups_lrd(model, args.weight_decay, no_weight_decay_list=HEAD_NO_WEIGHT_DECAY,
                              layer_decay=args.layer_decay)
    return apply_linear_layer_scale(groups, args.linear_layer_scale)


def validate_args(args: argparse.Namespace) -> None:
    """Start-up checks (nothing is read or written yet)."""
    harness.check_positive(args, "batch_size", "epochs", "accum_iter", "input_size", "checkpoint_interval",
                           "print_freq", "eval_scale", "nb_classes", "blr", "lr", "layer_decay",
                           "linear_layer_scale", "eval_base_resolution", "eval_reference_resolution",
                           "base_resolution", "num_workers", "warmup_epochs", "weight_decay", "min_lr",
                           "start_epoch", "clip_grad", "save_every_steps",
                           allow_zero=("num_workers", "warmup_epochs", "weight_decay", "min_lr", "start_epoch",
                                       "clip_grad", "save_every_steps"))
    harness.require(0.0 < args.scale_min <= args.scale_max <= 1.0,
                    f"--scale_min {args.scale_min} / --scale_max {args.scale_max}: need 0 < min <= max <= 1")
    if args.model is not None:
        resolve_model_name(args.model, quiet=True)
    if not args.eval and args.warmup_epochs >= args.epochs:
        print(f"WARNING: --warmup_epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate never "
              f"reaches --blr/--lr (it stays in the linear warmup for the whole run)")


def check_encoder(args: argparse.Namespace, device: torch.device) -> None:
    """``--input_size`` against the encoder's patch size (read from the model, not its name); a note on fp16 on
    CPU."""
    patch = factory_patch_size(models_vit.MODELS[args.model])
    harness.require(args.input_size % patch == 0,
                    f"--input_size {args.input_size}: must be a multiple of the patch size {patch} of {args.model}")
    if AmpConfig(args.amp, device).dtype == torch.float16 and device.type != "cuda":
        print("NOTE: fp16 autocast on CPU is slow and loses precision; --amp bf16 is the CPU choice")


def set_num_classes(args: argparse.Namespace, num_classes: int) -> None:
    """``--nb_classes`` (default: the data's ``num_classes``); fewer than the data has is an error."""
    if args.nb_classes is None:
        args.nb_classes = num_classes
    elif args.nb_classes < num_classes:
        raise harness.UserError(f"--nb_classes {args.nb_classes} is smaller than the {num_classes} classes of the "
                                f"data")
    elif args.nb_classes > num_classes:
        print(f"WARNING: --nb_classes {args.nb_classes} > {num_classes} classes in the data (unused outputs)")


def load_resumed(model: nn.Module, resumed: Optional[Mapping], resume: Optional[str]) -> float:
    """The resumed run's weights (strict; its unused ``pos_embed`` may differ in size: any ``--input_size``).
    Returns its best acc1 (0 when not resuming)."""
    if resumed is None:
        return 0.0
    harness.load_resumed_weights(model, resumed["model"], f"resume checkpoint {resume}",
                                 check="--model, --global_pool, --nb_classes", unused=("pos_embed",))
    print(f"resumed model weights from {resume}")
    return float(resumed.get("best_acc1", 0.0) or 0.0)


class ProbeEvaluation:
    """Top-1/top-5 of ``model`` on the validation set (sharded over ranks) at the eval ``res``; keeps the best acc1
    and the last stats. ``model`` is the module that trains (set it again once compiled / wrapped in DDP)."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, val_ds: Dataset, device: torch.device,
                 res: float, best_acc1: float) -> None:
        self.args, self.model, self.device, self.res, self.best_acc1 = args, model, device, res, best_acc1
        self.amp_dtype = AmpConfig(args.amp, device).dtype
        self.last: dict[str, float] = {}
        self.loader = DataLoader(val_ds, sampler=ShardSampler(val_ds, dist_util.get_world_size(),
                                                              dist_util.get_rank()),
                                 batch_size=args.batch_size, num_workers=args.num_workers,
                                 pin_memory=args.pin_mem and device.type == "cuda", drop_last=False,
                                 collate_fn=ValCollate(args.eval_scale))

    def __call__(self) -> dict[str, float]:
        self.last = evaluate(self.loader, self.model, self.device, self.res, self.amp_dtype, self.args.print_freq)
        self.best_acc1 = max(self.best_acc1, self.last["acc1"])
        return self.last

    def once(self) -> dict[str, float]:
        """``--eval``: the stats ``{'acc1', 'acc5', 'loss', 'n'}``, with the accuracy line."""
        stats = self()
        print(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.2f} %")
        return stats

    def after_epoch(self, epoch: int, log_writer: Any, n_train: int) -> dict[str, float]:
        """The evaluation of an epoch: the accuracy line, ``perf/test_*`` in TensorBoard, the log entries."""
        stats = self()
        print(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.2f} % "
              f"(best {self.best_acc1:.2f} %)")
        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"perf/test_{key}", stats[key], epoch)
        return {**{f"test_{k}": v for k, v in stats.items()}, "n_parameters": n_train, "max_accuracy": self.best_acc1}


def train_loader(args: argparse.Namespace, train_ds: Dataset, cfg: Optional[Mapping],
                 device: torch.device) -> tuple[DataLoader, ResumableSampler]:
    """The training loader (batch: ``--batch_size`` times the config's ``data.oversample``) and its sampler (a
    ``DistributedSampler`` that can resume mid-epoch)."""
    oversample = float(((cfg or {}).get("data") or {}).get("oversample", 1.0) or 1.0)
    batch = max(1, int(args.batch_size * oversample))
    sampler = ResumableSampler(DistributedSampler(train_ds, num_replicas=dist_util.get_world_size(),
                                                  rank=dist_util.get_rank(), shuffle=True, seed=args.seed))
    loader = DataLoader(train_ds, sampler=sampler, batch_size=batch, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True)
    harness.require(len(loader) > 0, f"the training set gives {len(sampler)} samples per process, fewer than the "
                                     f"batch size {batch}: lower --batch_size or add data")
    return loader, sampler


# ------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run a linear probe / finetune (or ``--eval``). Returns ``{'test': last stats, 'best_acc1', 'history'}``
    (``--eval``: the evaluation stats ``{'acc1', 'acc5', 'loss', 'n'}``)."""
    if args.output_dir is None:
        args.output_dir = "./output_dir/finetune" if args.finetune else "./output_dir/linprobe"
    device = harness.setup(args)
    validate_args(args)
    out_dir = harness.prepare_output(args, training=not args.eval)
    resume, resumed, pretrained, pretrained_args = read_start(args, out_dir, WRITER)
    choose_encoder(args, resume, resumed, pretrained, pretrained_args, DEFAULT_MODEL)
    check_encoder(args, device)

    # --- data, model, evaluation
    train_ds, val_ds, num_classes, cfg = build_datasets(args)
    set_num_classes(args, num_classes)
    res_info = report_resolutions(args)
    model = build_model(args, args.nb_classes, resuming=resumed is not None, pretrained=pretrained).to(device)
    probe = ProbeEvaluation(args, model, val_ds, device, res_info["eval_res"], load_resumed(model, resumed, resume))
    if args.eval:
        return harness.evaluate_only(out_dir, args, cfg, probe.once, resolution=res_info)

    # --- optimizer, resumed training state
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer, amp, start_step = harness.start_optimizer(build_param_groups(model, args), args, device, resumed,
                                                         resume, keep_names=True)
    if resumed is not None and "optimizer" in resumed:
        print(f"best acc1 so far {probe.best_acc1:.2f}")
    if start_step is None:
        dist_util.cleanup()
        return {"test": {}, "best_acc1": probe.best_acc1, "history": []}
    assert train_ds is not None
    loader, sampler = train_loader(args, train_ds, cfg, device)
    steps_per_epoch = len(loader)
    print(f"model {args.model} ({'finetune' if args.finetune else 'linear probe'}): {n_params / 1e6:.2f} M "
          f"parameters, {n_train / 1e6:.3f} M trainable; {args.nb_classes} classes; effective batch "
          f"{args.batch_size * args.accum_iter * dist_util.get_world_size()}; lr {args.lr:.3g} (blr {args.blr:.3g})")
    model_without_ddp = model
    model = probe.model = harness.wrap_ddp(maybe_compile(model, args), args, device)

    # --- the run starts: from here on the output folder describes it
    run = harness.TrainingRun(args, out_dir, WRITER, cfg, parser=get_args_parser(), dead_flags=DEAD_FLAGS,
                              start_step=start_step, resumed=resumed, resolution=res_info)
    run.resume_sampler(sampler, loader.batch_size)

    def train_epoch(epoch: int, stop: harness.StopRequest) -> dict[str, float]:
        sampler.set_epoch(epoch)
        return train_one_epoch(model, nn.CrossEntropyLoss(), loader, optimizer, device, epoch, amp, args,
                               log_writer=run.log_writer, max_norm=args.clip_grad, on_finite_loss=run.keeper.verify,
                               stop=stop, start_step=run.start_step,
                               on_step_end=run.step_saver(epoch, steps_per_epoch))

    history = run.train(train_epoch, lambda epoch: {
        "model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
        "scaler": amp.state_dict(), "args": args_to_plain(args), "best_acc1": probe.best_acc1},
        evaluate=lambda epoch: probe.after_epoch(epoch, run.log_writer, n_train), mid_epoch_saves=True)
    return {"test": probe.last, "best_acc1": probe.best_acc1, "history": history}


if __name__ == "__main__":
    harness.run(main, get_args_parser())
