"""Scale-MAE pretraining, and kNN evaluation with ``--eval_only``.

Single process (CPU or one GPU):   python main_pretrain.py --config config/fmow.yaml --model mae_vit_large_patch16
One node, 8 GPUs:                  torchrun --nproc_per_node=8 main_pretrain.py --config config/fmow.yaml ...
Old launcher (passes --local-rank): python -m torch.distributed.launch --nproc_per_node=4 main_pretrain.py ...
kNN of a checkpoint:               python main_pretrain.py --resume ckpt.pth --eval_only --eval_dataset resisc \
                                       --eval_train_fnames <root>/train.txt --eval_val_fnames <root>/val.txt
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch

import harness
import models_mae
from engine_pretrain import train_one_epoch
from util import dist as dist_util
from util.accel import add_compile_args, apply_model_options, maybe_compile
from util.amp import amp_dtype
from util.checkpoint import args_to_plain, strip_module_prefix
from util.lr_decay import param_groups_weight_decay
from util.weights import factory_patch_size

# Flags kept so that old command lines still parse; they change nothing (as in the original).
DEAD_FLAGS = {
    "norm_pix_loss": "the loss never normalises pixels",
    "decoder_aux_loss_layers": "never read by the model",
    "fixed_output_size_min": "only fed dead code",
    "fixed_output_size_max": "only fed dead code",
    "loss_masking": "the loss is always restricted to masked patches",
    "self_attention": "never read by the model",
    "target_size_scheduler": "only affected dead code paths",
    "wandb_id": "wandb is not used; see TensorBoard in --log_dir",
    "name": "wandb is not used; the run is named by --output_dir",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Scale-MAE pretraining", add_help=True)
    g = p.add_argument_group("schedule")
    harness.add_schedule_args(g, batch_size=32, epochs=800, blr=1.5e-4, warmup_epochs=20, warmup_type=int)
    g.add_argument("--grad_checkpointing", nargs="?", const="all", default=None, choices=["all", "heads"],
                   help="recompute activations in backward (less memory): all (the flag alone) = blocks, FPN and "
                        "heads; heads = only the two reconstruction heads (default off)")
    add_compile_args(g)
    g.add_argument("--fast_decoder", default="auto", choices=["auto", "on", "off"],
                   help="channels-last decoder kernels (layers/fast_decoder.py, same results): auto = on CPU "
                        "(default auto)")

    g = p.add_argument_group("model (unset flags keep the factory's values, or the checkpoint's when resuming)")
    g.add_argument("--model", default=None, type=str,
                   help=f"one of {sorted(models_mae.MODELS)} (default mae_vit_base_patch16, or the checkpoint's "
                        "architecture when resuming/evaluating)")
    g.add_argument("--input_size", default=224, type=int,
                   help="encoder input side, a multiple of the patch (default 224)")
    g.add_argument("--target_size", nargs="*", type=int, default=None,
                   help="high-resolution target side; must be 32 * input_size / patch (default: that, 448 at 224)")
    g.add_argument("--source_size", nargs="*", type=int, default=None,
                   help="smaller encoder input side(s), multiples of the patch (default: input_size)")
    g.add_argument("--source_size_scheduler", default="constant", choices=["constant", "random"],
                   help="constant: first --source_size; random: one of --source_size per step (default constant)")
    g.add_argument("--mask_ratio", default=0.75, type=float,
                   help="fraction of patches removed, in [0, 1) (default 0.75)")
    g.add_argument("--decoder_depth", default=None, type=int, help="decoder blocks (default 3; tiny: 2)")
    g.add_argument("--use_mask_token", action="store_true", default=None, help="learned mask token (always on)")
    g.add_argument("--no_mask_token", action="store_false", dest="use_mask_token",
                   help="not supported (the original crashes); an error")
    g.add_argument("--project_pos_emb", action="store_true", default=None,
                   help="not supported (the original crashes); an error")
    g.add_argument("--absolute_scale", action="store_true", default=None,
                   help="ignore res: plain MAE positional embedding")
    g.add_argument("--fcn_dim", default=None, type=int,
                   help="width of the reconstruction heads (default 512; tiny: 64)")
    g.add_argument("--fcn_layers", default=None, type=int, help="residual blocks per reconstruction head (default 2)")
    g.add_argument("--share_fcn_head", action="store_false", dest="independent_fcn_head", default=None,
                   help="one reconstruction head for both bands (default: one per band)")
    g.add_argument("--use_l1_loss", action="store_true", default=None, help="L1 (not L2) on the high-frequency band")
    g.add_argument("--l1_loss_weight", default=None, type=float,
                   help="weight of the high band with --use_l1_loss (default 1)")
    g.add_argument("--band_config", nargs=2, type=int, default=None,
                   help="[dim1, dim2]: high band = target - up(down(target, dim1)); dim2 matters only when 224 "
                        "(default 7 56)")
    g.add_argument("--progressive", action="store_true", default=None, help="FPN shares its first upsampling")

    g = harness.add_data_args(p, default_config="fmow.yaml",
                              config_help="YAML data config (fMoW-rgb under the repository's data/ folder, the "
                                          "original README's `ln -s ~/data/fmow-rgb data`)")
    g.add_argument("--scale_min", default=0.2, type=float, help="random resized crop: min area fraction (default 0.2)")
    g.add_argument("--scale_max", default=1.0, type=float, help="random resized crop: max area fraction (default 1.0)")
    g.add_argument("--base_resolution", default=2.5, type=float,
                   help="res = (crop - 1) / target * base_resolution (default 2.5)")
    g.add_argument("--gpu_pipeline", action="store_true",
                   help="JPEG decode (nvJPEG) and crops/resizes on the training device; CPU workers only read bytes "
                        "and draw the random crops (same seeding and maths; decoder differences on CUDA)")

    g = p.add_argument_group("kNN evaluation")
    g.add_argument("--eval_only", action="store_true", help="run kNN on the (resumed) model and exit")
    g.add_argument("--allow_random_init", action="store_true",
                   help="let --eval_only run without --resume (a randomly initialised model)")
    g.add_argument("--skip_knn_eval", action="store_true", help="no kNN monitor during training")
    g.add_argument("--knn", default=20, type=int, help="k of the kNN classifier (default 20)")
    g.add_argument("--knn_ks", nargs="*", type=int, default=None, help="several k at once, e.g. 10 20 100 200")
    g.add_argument("--knn_temperature", default=0.07, type=float, help="vote weight exp(sim / T) (default 0.07)")
    g.add_argument("--knn_eval_freq", default=5, type=int,
                   help="kNN before epoch e when e %% freq == 0, and at the end (default 5)")
    g.add_argument("--eval_dataset", default="resisc", type=str,
                   help="resisc, mlrsnet, airound, cvbrct, eurosat, optimal-31, whu-rs19, ucmerced, fmow (sets the "
                        "normalisation), or demo (built-in synthetic scenes) (default resisc)")
    g.add_argument("--eval_train_fnames", default=None, type=str, help="kNN bank: split list file or ImageFolder")
    g.add_argument("--eval_val_fnames", default=None, type=str, help="kNN queries: split list file or ImageFolder")
    g.add_argument("--eval_path", default=None, type=str, help="ImageFolder root split 90/10 at random (seeded)")
    g.add_argument("--eval_scale", nargs="*", type=int, default=[56, 112, 224],
                   help="evaluation image sides (default 56 112 224)")
    g.add_argument("--eval_gsd", action="store_true", help="res = eval_base_resolution * 224 / eval_scale")
    g.add_argument("--eval_base_resolution", default=1.0, type=float, help="kNN res (default 1.0)")
    g.add_argument("--eval_batch_size", default=None, type=int, help="(default 64 with --eval_only, else 32)")
    g.add_argument("--eval_amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast for kNN feature extraction (default none: fp32, as the original)")

    harness.add_run_args(p, output_dir_default="./output_dir",
                         output_dir_help="checkpoints, log.txt, config.yaml, figures",
                         resume_help="checkpoint path or URL to resume from (or to evaluate with --eval_only)",
                         checkpoint_interval=20, print_help="log every n steps; also the reconstruction figure")

    harness.add_distributed_args(p)

    g = p.add_argument_group("accepted for compatibility, no effect")
    g.add_argument("--norm_pix_loss", action="store_true", default=True)
    g.add_argument("--reconst_loss", action="store_true", dest="norm_pix_loss")
    g.add_argument("--decoder_aux_loss_layers", type=int, default=1)
    g.add_argument("--fixed_output_size_min", type=int, default=224)
    g.add_argument("--fixed_output_size_max", type=int, default=336)
    g.add_argument("--no_loss_masking", action="store_false", dest="loss_masking")
    g.add_argument("--self_attention", action="store_true")
    g.add_argument("--target_size_scheduler", default="constant", type=str)
    g.add_argument("--wandb_id", default=None, type=str)
    g.add_argument("--name", default="", type=str)
    return p


# ---------------------------------------------------------------------------------------------- setup helpers
WRITER = "main_pretrain"
DEFAULT_MODEL = "mae_vit_base_patch16"
MODEL_FLAGS = ("decoder_depth", "use_mask_token", "project_pos_emb", "absolute_scale", "fcn_dim", "fcn_layers",
               "independent_fcn_head", "use_l1_loss", "l1_loss_weight", "band_config", "progressive")
# model flags that change the loss or the features but not the tensor shapes: kept from the checkpoint's args
BEHAVIOUR_FLAGS = ("absolute_scale", "use_l1_loss", "l1_loss_weight", "band_config")


def resolve_model_name(args: argparse.Namespace, checkpoint: Optional[dict]) -> tuple[str, dict]:
    """The factory and kwarg overrides to build: --model, else the checkpoint's architecture (its saved name, its
    tensor shapes, and its loss/feature flags the user did not set), else mae_vit_base_patch16."""
    if args.model is not None:
        if args.model not in models_mae.MODELS:
            raise harness.UserError(f"--model {args.model!r} is not a pretraining model; choose from "
                                    f"{sorted(models_mae.MODELS)}")
        return args.model, {}
    if checkpoint is None or "model" not in checkpoint:
        return DEFAULT_MODEL, {}
    saved_args = checkpoint.get("args") or {}
    writer = harness.checkpoint_writer(checkpoint)
    if writer not in (None, WRITER):
        raise harness.UserError(f"the checkpoint was written by {writer}.py (a classifier), not by main_pretrain.py: "
                                f"pass a pretraining checkpoint (kNN and pretraining need the MAE's weights)")
    try:
        name, kwargs = models_mae.infer_architecture(strip_module_prefix(checkpoint["model"]))
    except ValueError as err:
        raise harness.UserError(f"cannot tell the checkpoint's architecture ({err}); pass --model") from None
    kwargs.pop("img_size", None)
    saved = saved_args.get("model")
    if saved in models_mae.MODELS and models_mae.MODELS[saved] is models_mae.MODELS[name]:
        name = saved
    for flag in BEHAVIOUR_FLAGS:
        if saved_args.get(flag) is not None:
            kwargs[flag] = saved_args[flag]
    print(f"--model not given: the checkpoint is {name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
    return name, kwargs


def build_model(args: argparse.Namespace, name: str, overrides: dict, in_chans: int) -> models_mae.MaskedAutoencoderViT:
    """The factory with the model flags the user set (unset flags are None: the checkpoint's architecture from
    ``overrides``, else the factory's values -- the original's command-line defaults for base/large/huge)."""
    kwargs = dict(overrides)
    kwargs.update(harness.explicit_flags(args, MODEL_FLAGS))
    kwargs.update(img_size=args.input_size, in_chans=in_chans, target_size=args.target_size)
    try:
        return models_mae.MODELS[name](**kwargs)
    except ValueError as err:
        raise harness.UserError(f"cannot build {name}: {err}") from None


UNUSED_TABLES = ("pos_embed", "decoder_pos_embed")


def load_model_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """A checkpoint's weights, strictly; its positional tables (never read in forward) are taken whatever
    ``--input_size`` they were made at."""
    harness.load_resumed_weights(model, state_dict, f"checkpoint {source}", unused=UNUSED_TABLES, adopt_unused=True)


def validate_args(args: argparse.Namespace) -> None:
    """Start-up checks of the flags that do not depend on the model (nothing is read or written yet)."""
    harness.check_positive(args, "batch_size", "epochs", "accum_iter", "input_size", "checkpoint_interval",
                           "print_freq", "knn", "knn_ks", "knn_eval_freq", "eval_scale", "eval_batch_size",
                           "decoder_depth", "fcn_dim", "fcn_layers", "band_config", "target_size", "source_size",
                           "blr", "lr", "knn_temperature", "eval_base_resolution", "base_resolution",
                           "save_every_steps", "num_workers", "warmup_epochs", "weight_decay", "min_lr",
                           "start_epoch", "clip_grad", "l1_loss_weight",
                           allow_zero=("save_every_steps", "num_workers", "warmup_epochs", "weight_decay",
                                       "min_lr", "start_epoch", "clip_grad"))
    harness.require(0.0 <= args.mask_ratio < 1.0,
                    f"--mask_ratio {args.mask_ratio}: must be in [0, 1) (the fraction of patches removed)")
    harness.require(0.0 < args.scale_min <= args.scale_max <= 1.0,
                    f"--scale_min {args.scale_min} / --scale_max {args.scale_max}: need 0 < min <= max <= 1")
    harness.require(args.use_mask_token is not False, "--no_mask_token is not supported (the original crashes)")
    harness.require(not args.project_pos_emb, "--project_pos_emb is not supported (the original crashes)")
    if args.eval_only and not args.resume and not args.allow_random_init:
        out = Path(args.output_dir) / harness.LATEST if args.output_dir else None
        harness.require(not args.no_autoresume and out is not None and out.is_file(),
                        "--eval_only needs weights: pass --resume <checkpoint.pth> (or --allow_random_init to "
                        "evaluate a randomly initialised model)")
    if not args.eval_only and args.warmup_epochs >= args.epochs:
        print(f"WARNING: --warmup_epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning rate never "
              f"reaches --blr/--lr (it stays in the linear warmup for the whole run)")


def validate_sizes(args: argparse.Namespace, patch: int) -> None:
    """--input_size/--target_size/--source_size against the model's patch size; fills their defaults."""
    harness.require(args.input_size % patch == 0,
                    f"--input_size {args.input_size}: must be a multiple of the patch size {patch} "
                    f"(e.g. {max(patch, args.input_size // patch * patch)} or "
                    f"{(args.input_size // patch + 1) * patch})")
    expected = 32 * args.input_size // patch
    if args.target_size is None or not args.target_size:
        args.target_size = [expected]
    harness.require(max(args.target_size) == expected,
                    f"--target_size {' '.join(map(str, args.target_size))}: the model reconstructs "
                    f"{expected} px for --input_size {args.input_size} (2x the input); omit --target_size")
    if args.source_size is None or not args.source_size:
        args.source_size = [args.input_size]
    for size in args.source_size:
        harness.require(size % patch == 0 and size <= args.input_size,
                        f"--source_size {size}: must be a multiple of the patch size {patch} and <= --input_size "
                        f"{args.input_size}")


def resolve_config(args: argparse.Namespace) -> str:
    """--config (default config/fmow.yaml) and, for the shipped configs, the default --data_root (data/)."""
    return harness.resolve_data_config(args, default="fmow.yaml")


# ------------------------------------------------------------------------------------------------------ data
def build_train_loader(args: argparse.Namespace, cfg: dict, device: torch.device):
    """Pretraining loader whose augmentations and order depend only on (seed, epoch, sample), not on workers/ranks.

    Returns the loader, its :class:`SeededSampler` (call ``set_epoch``) and the number of steps in a full epoch.
    """
    from dataloaders.builders import build_pretrain_dataset, build_pretrain_sampler
    from dataloaders.seeding import SeededDataset, SeededSampler

    dataset = build_pretrain_dataset(
        cfg, input_size=args.input_size, target_size=max(args.target_size), scale_min=args.scale_min,
        scale_max=args.scale_max, base_resolution=args.base_resolution, seed=args.seed,
    )
    base = build_pretrain_sampler(dataset, cfg, num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    sampler = SeededSampler(base, rank=args.rank, world_size=args.world_size)
    workers = args.num_workers
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset, args.seed), sampler=sampler, batch_size=args.batch_size, num_workers=workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return loader, sampler, len(base) // args.batch_size


def knn_sources_given(args: argparse.Namespace) -> bool:
    return bool(args.eval_train_fnames or args.eval_val_fnames or args.eval_path) or args.eval_dataset == "demo"


def build_knn_sets(args: argparse.Namespace):
    """kNN bank and query datasets, or None when the training monitor has no data (one warning line).

    Built at start-up, so that a wrong flag fails before any training; with --eval_only, data is required."""
    if not knn_sources_given(args):
        if args.eval_only:
            raise harness.UserError("--eval_only needs evaluation data: --eval_train_fnames and --eval_val_fnames "
                                    "(split list files or ImageFolder roots) or --eval_path (an ImageFolder, split "
                                    "90/10)")
        print("WARNING: kNN monitor off: no evaluation data given (pass --eval_train_fnames and --eval_val_fnames, "
              "or --eval_path; --skip_knn_eval silences this)")
        return None
    from dataloaders.builders import build_eval_datasets

    from dataloaders.scenes import warn_unseen_classes

    try:
        sets = build_eval_datasets(args.eval_dataset, train_fnames=args.eval_train_fnames,
                                   val_fnames=args.eval_val_fnames, eval_path=args.eval_path, seed=args.seed)
    except ValueError as err:
        raise harness.UserError(f"kNN evaluation data: {err}") from None
    bank, k = len(sets[0]), max(args.knn_ks or [args.knn])
    if k > bank:
        print(f"WARNING: --knn{'_ks' if args.knn_ks else ''} {k} is larger than the kNN bank ({bank} images): "
              f"k is clipped to {bank}, so every query votes with the whole bank (lower k or add bank images)")
    warn_unseen_classes(sets[0], sets[1], "the kNN bank")
    return sets


def run_knn(args, model, knn_sets, device, epoch: Optional[int], log_writer) -> dict:
    from util.knn_eval import evaluate_knn, format_table, save_knn_report

    train_set, val_set, num_classes = knn_sets
    ks = args.knn_ks or [args.knn]
    amp = amp_dtype(args.eval_amp)
    result = evaluate_knn(
        model, train_set, val_set, scales=args.eval_scale, ks=ks, temperature=args.knn_temperature,
        base_resolution=args.eval_base_resolution, eval_gsd=args.eval_gsd, device=device,
        batch_size=args.eval_batch_size, num_workers=min(args.num_workers, 4), num_classes=num_classes,
        amp_dtype=amp,
    )
    print(f"kNN ({args.eval_dataset}, bank {result['bank_size']}, queries {result['num_queries']}"
          + (f", epoch {epoch}" if epoch is not None else "") + ")\n" + format_table(result))
    for scale, entry in result["scales"].items():
        print(f"eval results ({scale}): {entry['k'][ks[0]]['top1'] / 100:.4f}")
    if dist_util.is_main_process():
        tag = "knn" if epoch is None else f"knn-epoch{epoch:04d}"
        paths = save_knn_report(result, args.output_dir, tag)
        print(f"kNN report: {paths['md']}, {paths['json']}, {paths['png']}")
        if log_writer is not None:
            for scale, entry in result["scales"].items():
                log_writer.add_scalar(f"knn-acc-{scale}", entry["k"][ks[0]]["top1"], epoch or 0)
    return result


def load_data_config(args: argparse.Namespace) -> dict:
    from dataloaders.config import load_config

    resolve_config(args)
    cfg = load_config(args.config, data_root=args.data_root, overrides=args.data_override)
    if float(cfg["data"].get("oversample") or 1.0) != 1.0:
        print(f"WARNING: data.oversample={cfg['data']['oversample']} in {args.config} is not used: the loader batch "
              f"is --batch_size (GeoTIFF configs filter windows with data.min_valid instead)")
    return cfg


def read_resume(args: argparse.Namespace, out_dir: Path) -> tuple[Optional[str], Optional[dict]]:
    """``(path, checkpoint)`` to resume (or evaluate) from: ``--resume``, else autoresume; a file that is not a
    pretraining checkpoint is an error (read before anything is written)."""
    resume = harness.find_resume(args, out_dir, WRITER)
    flag = "--resume" if args.resume else "autoresume"
    checkpoint = harness.read_checkpoint(resume, flag) if resume else None
    if checkpoint is not None and ("model" not in checkpoint
                                   or harness.checkpoint_writer(checkpoint) not in (None, WRITER)):
        kind = harness.checkpoint_kind(checkpoint)
        raise harness.UserError(f"{flag} {resume}: not a pretraining checkpoint ("
                                + (kind if kind else f"keys: {sorted(checkpoint)[:8]}")
                                + "); --resume takes a checkpoint of main_pretrain.py (or the original release)")
    return resume, checkpoint


def build_loader(args: argparse.Namespace, cfg: dict, device: torch.device):
    """The training loader (``--gpu_pipeline``: decoding on the device), its sampler and the steps per epoch; too
    few samples for a batch is an error."""
    if args.gpu_pipeline:
        from dataloaders.gpu_pipeline import build_gpu_pipeline_loader

        loader, sampler, steps_per_epoch = build_gpu_pipeline_loader(args, cfg, device)
    else:
        loader, sampler, steps_per_epoch = build_train_loader(args, cfg, device)
    harness.require(steps_per_epoch > 0, f"the dataset gives {len(sampler)} samples per process, fewer than "
                                         f"--batch_size {args.batch_size}: lower the batch size or add data")
    return loader, sampler, steps_per_epoch


class ReconstructionFigures:
    """The reconstruction figure every ``--print_freq`` steps (rank 0): host copies of the first samples are taken
    at the step; drawing and saving run on a background thread (``util.visualize.BackgroundFigures``, the context
    to enter), off the step."""

    def __init__(self, model: torch.nn.Module, cfg: dict, out_dir: Path, log_writer: Any) -> None:
        from util.visualize import BackgroundFigures

        self.model, self.out_dir, self.log_writer = model, out_dir, log_writer
        self.mean, self.std = cfg["data"]["mean"], cfg["data"]["std"]
        self.vis_factor = float(cfg["data"].get("vis_factor", 1.0) or 1.0)
        self.thread = BackgroundFigures()

    def _draw(self, global_step: int, imgs, targets, preds, mask) -> None:
        from util.visualize import reconstruction_grid, save_reconstruction

        fig = reconstruction_grid(self.model, imgs, targets, preds, mask, self.mean, self.std, self.vis_factor)
        save_reconstruction(fig, self.out_dir / "vis" / f"step{global_step:08d}.png", self.log_writer,
                            "reconstruction", global_step)

    def __call__(self, global_step: int, batch_out) -> None:
        imgs, targets, outputs = batch_out
        host = [t[:4].detach().float().cpu() for t in (imgs, targets, *outputs[1], outputs[2])]
        self.thread.submit(self._draw, global_step, host[0], host[1], host[2:5], host[5])


# ------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    """Pretrain (or, with --eval_only, evaluate by kNN). Returns ``{'history': [...], 'knn_epochN': ...}`` or the
    kNN result. User errors raise ``harness.UserError`` (one line from the command line)."""
    device = harness.setup(args)
    validate_args(args)
    out_dir = harness.prepare_output(args, training=not args.eval_only)
    resume, checkpoint = read_resume(args, out_dir)

    # --- data config, model, sizes
    cfg = None if args.eval_only else load_data_config(args)
    name, overrides = resolve_model_name(args, checkpoint)
    in_chans = overrides.pop("in_chans", 3) if cfg is None else len(cfg["data"]["mean"])
    overrides.pop("in_chans", None)
    args.model = name
    args.patch_size = factory_patch_size(models_mae.MODELS[name])  # read from the model, not its name
    validate_sizes(args, args.patch_size)
    if args.eval_batch_size is None:
        args.eval_batch_size = 64 if args.eval_only else 32
    knn_sets = build_knn_sets(args) if (args.eval_only or not args.skip_knn_eval) else None
    model = build_model(args, name, overrides, in_chans).to(device)
    apply_model_options(model, args, device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    if checkpoint is not None:
        load_model_weights(model, checkpoint["model"], resume)
        print(f"loaded model weights from {resume}")
    eval_model = maybe_compile(model, args)  # kNN features (the same wrapper trains below)
    if args.eval_only:
        print(f"model {name}: {n_params:.1f} M parameters")
        if checkpoint is None:
            print("WARNING: --allow_random_init: evaluating a randomly initialised model")
        return harness.evaluate_only(out_dir, args, cfg, lambda: run_knn(args, eval_model, knn_sets, device, None,
                                                                         None))

    # --- optimizer, resumed training state, data
    optimizer, amp, start_step = harness.start_optimizer(param_groups_weight_decay(model, args.weight_decay), args,
                                                         device, checkpoint, resume)
    if start_step is None:
        dist_util.cleanup()
        return {"history": []}
    loader, sampler, steps_per_epoch = build_loader(args, cfg, device)
    print(f"model {name}: {n_params:.1f} M parameters; effective batch "
          f"{args.batch_size * args.accum_iter * args.world_size}; lr {args.lr:.3g} (blr {args.blr:.3g}); "
          f"{steps_per_epoch} steps per epoch")
    model_without_ddp = model
    model = harness.wrap_ddp(eval_model, args, device, find_unused_parameters=True)

    # --- the run starts: from here on the output folder describes it
    run = harness.TrainingRun(args, out_dir, WRITER, cfg, parser=get_args_parser(), dead_flags=DEAD_FLAGS,
                              start_step=start_step, resumed=checkpoint, train_data=loader)
    run.resume_sampler(sampler, args.batch_size)
    figures = ReconstructionFigures(model_without_ddp, cfg, out_dir, run.log_writer)
    results: dict[str, Any] = {}

    def knn_monitor(epoch: int) -> None:
        if knn_sets is not None and run.start_step == 0 and (epoch % args.knn_eval_freq == 0 or epoch == args.epochs):
            results[f"knn_epoch{epoch}"] = run_knn(args, eval_model, knn_sets, device, epoch, run.log_writer)

    def state(epoch_done: int) -> dict:
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_done,
                "scaler": amp.state_dict(), "args": args_to_plain(args)}

    def train_epoch(epoch: int, stop: harness.StopRequest) -> dict:
        sampler.set_epoch(epoch)
        return train_one_epoch(model, loader, optimizer, device, epoch, amp, args, run.log_writer,
                               start_step=run.start_step, steps_per_epoch=steps_per_epoch,
                               on_step_end=run.step_saver(epoch, steps_per_epoch), on_visualize=figures,
                               on_finite_loss=run.keeper.verify, stop=stop)

    results["history"] = run.train(train_epoch, state, before_epoch=knn_monitor, context=figures.thread,
                                   mid_epoch_saves=True, announce=False)
    return results


if __name__ == "__main__":
    harness.run(main, get_args_parser())
