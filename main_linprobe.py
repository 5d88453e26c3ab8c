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

Resolution (``res``): training samples carry ``input_res = (crop_side - 1) / input_size * base_resolution`` from the
random resized crop (area fraction in [scale_min, scale_max]); validation uses one ``eval_res`` for every sample:
``eval_base_resolution * eval_reference_resolution / eval_scale`` with ``--eval_gsd``, else
``eval_base_resolution``. These are the original formulas; with the original defaults they disagree (train about
1.8-2.5, eval 1.0), so both are printed and a warning is given when they differ by more than 10 %.
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

import models_vit
from engine_finetune import evaluate, train_one_epoch
from util import dist as dist_util
from util.accel import adamw, add_compile_args, maybe_compile
from util.amp import AmpConfig
from util.checkpoint import (CheckpointError, args_to_plain, describe_state_dict_mismatch, find_latest_checkpoint,
                             load_checkpoint, strip_module_prefix)
from util.dist import ShardSampler
from util.launch import (add_distributed_args, add_loader_args, add_run_args, init_run, open_log_writer,
                         save_epoch_checkpoints, save_run_config, training_run, warn_dead_flags)
from util.lr_decay import apply_linear_layer_scale, param_groups_lrd, param_groups_weight_decay
from util.lr_sched import effective_lr
from util.metrics import JsonlLogger

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


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Scale-MAE linear probing / finetuning", add_help=True)

    g = p.add_argument_group("schedule")
    g.add_argument("--batch_size", default=64, type=int,
                   help="per-process batch (times the config's oversample); effective = batch * accum * world")
    g.add_argument("--epochs", default=400, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps per optimizer step")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (>= 2-D tensors)")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; default blr * effective batch / 256")
    g.add_argument("--blr", type=float, default=1e-3, help="base lr: lr = blr * effective batch / 256")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (--finetune only)")
    g.add_argument("--linear_layer_scale", type=float, default=1.0,
                   help="extra lr scale of the head-weight group (--finetune only)")
    g.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=0, help="linear warmup, per iteration")
    g.add_argument("--clip_grad", type=float, default=None, help="clip the global grad norm (off in the original)")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "fp16", "bf16"],
                   help="mixed precision: auto = bf16 on GPUs that support it, else fp16 (autocast + GradScaler) on "
                        "CUDA; none on CPU; bf16 works on CPU")
    add_compile_args(g)
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute encoder blocks in backward (--finetune only; a frozen encoder stores nothing)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_large_patch16", type=str,
                   help=f"encoder: {', '.join(models_vit.MODELS)} (an MAE name such as mae_vit_large_patch16 "
                        f"is mapped to its encoder)")
    g.add_argument("--input_size", default=224, type=int, help="training image side (px)")
    g.add_argument("--nb_classes", default=None, type=int, help="classifier size (default: from the dataset)")
    g.add_argument("--global_pool", action="store_true", help="mean of patch tokens + fc_norm instead of cls token")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token (default)")
    g.set_defaults(global_pool=False)
    g.add_argument("--finetune", action="store_true", help="train the whole encoder instead of a linear probe")
    g.add_argument("--checkpoint_path", default=None, type=str,
                   help="pretrained weights: pretraining checkpoint (ours or the original release), encoder file "
                        "(.pth/.safetensors from tools/export_encoder.py); path or URL")

    g = p.add_argument_group("data")
    g.add_argument("--config", default="config.yaml", type=str,
                   help="YAML data config of the TRAIN set, e.g. config/resisc.yaml, config/demo.yaml")
    g.add_argument("--data_root", default=None, type=str,
                   help="folder that relative paths in --config and --eval_path resolve against")
    g.add_argument("--data_override", nargs="*", default=[], metavar="data.KEY=VALUE",
                   help="override config entries, e.g. data.img_dir=/data/resisc45/train.txt")
    g.add_argument("--scale_min", default=0.5, type=float, help="random resized crop: min area fraction")
    g.add_argument("--scale_max", default=1.0, type=float, help="random resized crop: max area fraction")
    g.add_argument("--base_resolution", default=2.5, type=float,
                   help="train res = (crop - 1) / input_size * base_resolution")
    add_loader_args(g)

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", default="resisc", type=str,
                   help="validation set id: resisc, mlrsnet, airound, cvbrct, eurosat, optimal-31, whu-rs19, "
                        "ucmerced, fmow, demo")
    g.add_argument("--eval_path", default="resisc45", type=str,
                   help="validation ImageFolder root or split-list file (with --eval_dataset demo and no "
                        "--eval_path: built-in synthetic scenes)")
    g.add_argument("--eval_scale", default=224, type=int,
                   help="validation image side (fmow: Resize+CenterCrop; others with --eval_resize)")
    g.add_argument("--eval_resize", action="store_true",
                   help="Resize+CenterCrop every validation set to --eval_scale (the original only did so for fmow)")
    g.add_argument("--eval_gsd", action="store_true",
                   help="eval res = eval_base_resolution * eval_reference_resolution / eval_scale")
    g.add_argument("--eval_base_resolution", default=1.0, type=float)
    g.add_argument("--eval_reference_resolution", default=224, type=float)
    g.add_argument("--eval", action="store_true", help="evaluate (the resumed model) and exit")

    g = add_run_args(p, output_dir_help="checkpoints, log.txt, config.yaml",
                     resume_help="checkpoint of this script to resume from (path or URL)")
    g.add_argument("--checkpoint_interval", default=20, type=int,
                   help="keep checkpoint-{epoch}.pth every n epochs (and the last); checkpoint-latest.pth always")
    g.add_argument("--print_freq", default=20, type=int, help="progress line every n steps")

    add_distributed_args(p)

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
def resolve_model_name(name: str) -> str:
    """A ``models_vit`` factory name; MAE names (``mae_vit_large_patch16[_dec512d8b]``) map to their encoder."""
    if name in models_vit.MODELS:
        return name
    if name.startswith("mae_"):
        encoder = name[len("mae_"):]
        if encoder.endswith("_dec512d8b"):
            encoder = encoder[: -len("_dec512d8b")]
        if encoder in models_vit.MODELS:
            print(f"NOTE: --model {name} is a pretraining model; using its encoder {encoder}")
            return encoder
    raise SystemExit(f"--model {name!r} is not an encoder; choose from {sorted(models_vit.MODELS)} "
                     f"(or an MAE name such as mae_vit_large_patch16)")


def eval_resolution(args: argparse.Namespace) -> float:
    """The validation res (the original's formula)."""
    if args.eval_gsd:
        return args.eval_base_resolution * args.eval_reference_resolution / args.eval_scale
    return args.eval_base_resolution


def train_resolution_range(args: argparse.Namespace) -> tuple[float, float, float]:
    """(min, median, max) of the training res for images of side ``input_size`` (crop side = sqrt(area) * side)."""
    n = args.input_size

    def res(area: float) -> float:
        side = max(1, round(math.sqrt(area) * n))
        return (side - 1) / n * args.base_resolution

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
    path = args.eval_path
    if args.eval_dataset.lower() == "demo" and path == get_args_parser().get_default("eval_path"):
        return None  # built-in synthetic validation scenes
    if path and args.data_root and "://" not in path and not os.path.isabs(os.path.expanduser(path)):
        return str(Path(args.data_root) / path)
    return os.path.expanduser(path) if path else path


def build_datasets(args: argparse.Namespace) -> tuple[Optional[Dataset], Dataset, int, Optional[dict]]:
    """(train_ds or None with --eval and no config, val_ds, num_classes, config)."""
    from dataloaders.builders import build_linprobe_datasets
    from dataloaders.config import load_config

    eval_path = _resolve_eval_path(args)
    if not Path(args.config).is_file():
        if args.eval:
            from dataloaders.eval_sets import build_scene_dataset, demo_eval_datasets, eval_transform

            tf = eval_transform(args.eval_dataset, "linprobe", args.eval_scale, resize=args.eval_resize or None)
            if eval_path is None:
                _, val, n = demo_eval_datasets(tf, args.seed)
                return None, val, n, None
            val = build_scene_dataset(eval_path, args.eval_dataset, tf)
            print(f"--config {args.config} not found: evaluating on {eval_path} alone "
                  f"({len(val.class_to_idx)} classes)")
            return None, val, len(val.class_to_idx), None
        raise SystemExit(f"--config {args.config} not found; pass the training-set config, e.g. "
                         f"config/resisc.yaml or config/demo.yaml")
    cfg = load_config(args.config, data_root=args.data_root, overrides=args.data_override)
    train_ds, val_ds, num_classes = build_linprobe_datasets(
        cfg, args.eval_dataset, eval_path, input_size=args.input_size, scale_min=args.scale_min,
        scale_max=args.scale_max, base_resolution=args.base_resolution, eval_scale=args.eval_scale, seed=args.seed,
        val_resize=True if args.eval_resize else None)
    return train_ds, val_ds, num_classes, cfg


# ----------------------------------------------------------------------------------------------------- model
def read_pretrained(path: str) -> dict[str, torch.Tensor]:
    """State dict from ``--checkpoint_path``: ``{'model': ...}`` checkpoints, bare state dicts, ``.safetensors``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise SystemExit(f"--checkpoint_path {path}: file not found")
        return load_file(path)
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"--checkpoint_path: {err}") from None
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    return strip_module_prefix({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)})


def load_pretrained(model: models_vit.VisionTransformer, path: str) -> models_vit.LoadReport:
    """Load ``--checkpoint_path`` into the encoder, checking missing/unexpected keys exactly
    (``models_vit.load_mae_checkpoint``); a classifier of another layout in the file (e.g. a probe's
    ``head.0/1.*``) is ignored."""
    sd = read_pretrained(path)
    own = model.state_dict()
    foreign_head = [k for k in sd if k.startswith("head.") and k not in own]
    if foreign_head:
        print(f"ignoring the checkpoint's classifier tensors {foreign_head}")
        sd = {k: v for k, v in sd.items() if k not in foreign_head}
    try:
        report = models_vit.load_mae_checkpoint(model, sd)
    except ValueError as err:
        raise SystemExit(f"--checkpoint_path {path}: {err}") from None
    print(f"loaded {path}: missing {report.missing_keys} (expected: the classifier, plus the unused pos_embed at "
          f"another input size); {len(report.unexpected_keys)} unused pretraining-only tensors (decoder etc.)")
    return report


def build_model(args: argparse.Namespace, num_classes: int, resuming: bool = False) -> models_vit.VisionTransformer:
    """Encoder + BatchNorm/Linear head; pretrained weights from ``--checkpoint_path`` unless resuming."""
    model = models_vit.MODELS[args.model](img_size=args.input_size, num_classes=num_classes,
                                          global_pool=args.global_pool)
    if args.checkpoint_path and not resuming:
        load_pretrained(model, args.checkpoint_path)
    elif args.checkpoint_path:
        print(f"resuming: --checkpoint_path {args.checkpoint_path} is not loaded (the resumed weights replace it)")
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


def _load_resume(args, resume: str, model: nn.Module, optimizer, amp: AmpConfig) -> float:
    """Weights (strict), and unless ``--eval`` optimizer/scaler/epoch; returns the best acc1 so far."""
    try:
        ckpt = load_checkpoint(resume)
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"--resume: {err}") from None
    if "model" not in ckpt:
        raise SystemExit(f"resume checkpoint {resume} has no 'model' entry (keys: {sorted(ckpt)})")
    state = strip_module_prefix(ckpt["model"])
    problem = describe_state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise SystemExit(f"resume checkpoint {resume} does not match the model (a pretraining checkpoint goes to "
                         f"--checkpoint_path; check --model, --global_pool, --nb_classes):\n{problem}")
    model.load_state_dict(state, strict=True)
    print(f"resumed model weights from {resume}")
    best = float(ckpt.get("best_acc1", 0.0) or 0.0)
    if "optimizer" in ckpt and "epoch" in ckpt and not args.eval:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise SystemExit(f"resume checkpoint {resume}: its optimizer state does not fit this run (linear probe "
                             f"vs --finetune?): {err}") from None
        amp.load_state_dict(ckpt.get("scaler"))
        args.start_epoch = 0 if args.restart else int(ckpt["epoch"]) + 1
        print(f"resumed optimizer; starting at epoch {args.start_epoch} (best acc1 so far {best:.2f})")
    return best


# ------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run a linear probe / finetune (or ``--eval``). Returns ``{'test': last stats, 'best_acc1', 'history'}``
    (``--eval``: the evaluation stats ``{'acc1', 'acc5', 'loss', 'n'}``)."""
    device = init_run(args)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None and dist_util.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    args.model = resolve_model_name(args.model)
    amp = AmpConfig(args.amp, device)
    amp_dtype = amp.dtype
    if amp_dtype == torch.float16 and device.type != "cuda":
        print("NOTE: fp16 autocast on CPU is slow and loses precision; --amp bf16 is the CPU choice")

    # --- what to resume from
    resume = args.resume
    if not resume and not args.no_autoresume and out_dir is not None:
        latest = find_latest_checkpoint(out_dir)
        if latest is not None:
            resume = str(latest)
            print(f"autoresume: found {resume}")

    # --- data
    train_ds, val_ds, num_classes, cfg = build_datasets(args)
    if args.nb_classes is None:
        args.nb_classes = num_classes
    elif args.nb_classes < num_classes:
        raise SystemExit(f"--nb_classes {args.nb_classes} is smaller than the {num_classes} classes of the data")
    elif args.nb_classes > num_classes:
        print(f"WARNING: --nb_classes {args.nb_classes} > {num_classes} classes in the data (unused outputs)")
    res_info = report_resolutions(args)
    eval_res = res_info["eval_res"]

    # --- model, optimizer
    model = build_model(args, args.nb_classes, resuming=bool(resume)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.accum_iter, world)
    print(f"model {args.model} ({'finetune' if args.finetune else 'linear probe'}): {n_params / 1e6:.2f} M "
          f"parameters, {n_train / 1e6:.3f} M trainable; {args.nb_classes} classes; effective batch "
          f"{args.batch_size * args.accum_iter * world}; lr {args.lr:.3g} (blr {args.blr:.3g})")
    param_groups = build_param_groups(model, args)
    optimizer = adamw(param_groups, args.lr, device)
    best_acc1 = 0.0
    if resume:
        best_acc1 = _load_resume(args, resume, model, optimizer, amp)

    model_without_ddp = model
    model = maybe_compile(model, args)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)

    # --- loaders
    pin = args.pin_mem and device.type == "cuda"
    val_loader = DataLoader(val_ds, sampler=ShardSampler(val_ds, world, rank), batch_size=args.batch_size,
                            num_workers=args.num_workers, pin_memory=pin, drop_last=False)

    if dist_util.is_main_process() and out_dir is not None:
        save_run_config(out_dir, args, cfg, evaluating=args.eval, resolution=res_info)
    warn_dead_flags(args, get_args_parser(), DEAD_FLAGS)

    if args.eval:
        stats = evaluate(val_loader, model, device, eval_res, amp_dtype, args.print_freq)
        print(f"Accuracy of the network on the {stats['n']} test images: {stats['acc1']:.2f} %")
        dist_util.cleanup()
        return stats

    assert train_ds is not None
    oversample = float(((cfg or {}).get("data") or {}).get("oversample", 1.0) or 1.0)
    train_batch = max(1, int(args.batch_size * oversample))
    train_sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_ds, sampler=train_sampler, batch_size=train_batch, num_workers=args.num_workers,
                              pin_memory=pin, drop_last=True)
    if len(train_loader) == 0:
        raise SystemExit(f"the training set gives {len(train_sampler)} samples per process, fewer than the batch "
                         f"size {train_batch}: lower --batch_size or add data")

    log_writer = open_log_writer(args.log_dir) if dist_util.is_main_process() and args.log_dir else None
    jsonl = JsonlLogger(out_dir)

    history: list[dict[str, Any]] = []
    test_stats: dict[str, float] = {}
    print(f"Start training for {args.epochs} epochs (from epoch {args.start_epoch})")
    with training_run(log_writer):
        for epoch in range(args.start_epoch, args.epochs):
            train_sampler.set_epoch(epoch)
            train_stats = train_one_epoch(model, nn.CrossEntropyLoss(), train_loader, optimizer, device, epoch,
                                          amp, args, log_writer=log_writer, max_norm=args.clip_grad)
            test_stats = evaluate(val_loader, model, device, eval_res, amp_dtype, args.print_freq)
            best_acc1 = max(best_acc1, test_stats["acc1"])
            print(f"Accuracy of the network on the {test_stats['n']} test images: {test_stats['acc1']:.2f} % "
                  f"(best {best_acc1:.2f} %)")
            if dist_util.is_main_process() and out_dir is not None:
                state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch, "scaler": amp.state_dict(), "args": args_to_plain(args),
                         "best_acc1": best_acc1}
                save_epoch_checkpoints(state, out_dir, epoch, args)
            if log_writer is not None:
                log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
                log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
                log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)
                log_writer.flush()
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()},
                         "epoch": epoch, "n_parameters": n_train, "max_accuracy": best_acc1}
            history.append(log_stats)
            jsonl.log(log_stats)
    dist_util.cleanup()
    return {"test": test_stats, "best_acc1": best_acc1, "history": history}


if __name__ == "__main__":
    cli = get_args_parser().parse_args()
    main(cli)
