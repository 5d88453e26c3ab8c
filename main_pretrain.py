"""Scale-MAE pretraining, and kNN evaluation with ``--eval_only``.

Single process (CPU or one GPU):   python main_pretrain.py --config config/fmow.yaml --model mae_vit_large_patch16
One node, 8 GPUs:                  torchrun --nproc_per_node=8 main_pretrain.py --config config/fmow.yaml ...
Old launcher (passes --local-rank): python -m torch.distributed.launch --nproc_per_node=4 main_pretrain.py ...
kNN of a checkpoint:               python main_pretrain.py --resume ckpt.pth --eval_only --eval_dataset resisc \
                                       --eval_train_fnames <root>/train.txt --eval_val_fnames <root>/val.txt
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import models_mae
from engine_pretrain import train_one_epoch
from util import dist as dist_util
from util.accel import adamw, add_compile_args, apply_model_options, maybe_compile
from util.amp import AmpConfig, amp_dtype
from util.checkpoint import (args_to_plain, describe_state_dict_mismatch, load_checkpoint, save_checkpoint,
                             strip_module_prefix)
from util.launch import (add_distributed_args, add_loader_args, add_run_args, init_run, open_log_writer,
                         save_epoch_checkpoints, save_run_config, training_run, warn_dead_flags)
from util.lr_decay import param_groups_weight_decay
from util.lr_sched import effective_lr
from util.metrics import JsonlLogger

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
    p = argparse.ArgumentParser("Scale-MAE pretraining", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("schedule")
    g.add_argument("--batch_size", default=32, type=int, help="per-process batch (effective = batch * accum * world)")
    g.add_argument("--epochs", default=800, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps per optimizer step")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (tensors with >= 2 dims)")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; default blr * effective batch / 256")
    g.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    g.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=int, default=20, help="linear warmup, per iteration")
    g.add_argument("--clip_grad", type=float, default=None, help="clip the global grad norm (off in the original)")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "fp16", "bf16"],
                   help="mixed precision: auto = bf16 on GPUs that support it, else fp16 + GradScaler on CUDA "
                        "(the original's choice); none (fp32) on CPU")
    g.add_argument("--grad_checkpointing", nargs="?", const="all", default=None, choices=["all", "heads"],
                   help="recompute activations in backward (less memory): all = blocks, FPN and heads; heads = only "
                        "the two reconstruction heads (most of the memory, small time cost)")
    add_compile_args(g)
    g.add_argument("--fast_decoder", default="auto", choices=["auto", "on", "off"],
                   help="channels-last decoder kernels (layers/fast_decoder.py, same results): auto = on CPU")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, type=str,
                   help=f"one of {sorted(models_mae.MODELS)}; default mae_vit_base_patch16, or the checkpoint's "
                        "architecture when resuming/evaluating")
    g.add_argument("--input_size", default=224, type=int, help="encoder input side (px)")
    g.add_argument("--target_size", nargs="*", type=int, default=None,
                   help="high-resolution target side; default 32 * input_size / patch (2x input at p=16)")
    g.add_argument("--source_size", nargs="*", type=int, default=None,
                   help="optional smaller encoder input side(s) (multiples of the patch); default input_size")
    g.add_argument("--source_size_scheduler", default="constant", choices=["constant", "random"],
                   help="constant: first --source_size; random: one of --source_size per step")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    g.add_argument("--decoder_depth", default=3, type=int)
    g.add_argument("--use_mask_token", action="store_true", default=True)
    g.add_argument("--no_mask_token", action="store_false", dest="use_mask_token",
                   help="not supported (the original crashes); raises an error")
    g.add_argument("--project_pos_emb", action="store_true", help="not supported (the original crashes)")
    g.add_argument("--absolute_scale", action="store_true", help="ignore res: plain MAE positional embedding")
    g.add_argument("--fcn_dim", default=512, type=int, help="width of the reconstruction heads")
    g.add_argument("--fcn_layers", default=2, type=int, help="residual blocks per reconstruction head")
    g.add_argument("--share_fcn_head", action="store_false", dest="independent_fcn_head",
                   help="one reconstruction head for both bands")
    g.add_argument("--use_l1_loss", action="store_true", help="L1 (not L2) on the high-frequency band")
    g.add_argument("--l1_loss_weight", default=1.0, type=float, help="weight of the high band when --use_l1_loss")
    g.add_argument("--band_config", nargs=2, type=int, default=[7, 56],
                   help="[dim1, dim2]: high band = target - up(down(target, dim1)); dim2 matters only when 224")
    g.add_argument("--progressive", action="store_true", help="FPN shares its first upsampling")

    g = p.add_argument_group("data")
    g.add_argument("--config", default="config.yaml", type=str, help="YAML data config, e.g. config/fmow.yaml")
    g.add_argument("--data_root", default=None, type=str,
                   help="root for relative paths in the config (default: the config file's folder)")
    g.add_argument("--data_override", nargs="*", default=[], metavar="data.KEY=VALUE",
                   help="override config entries, e.g. data.img_dir=/data/fmow/train")
    g.add_argument("--scale_min", default=0.2, type=float, help="random resized crop: min area fraction")
    g.add_argument("--scale_max", default=1.0, type=float, help="random resized crop: max area fraction")
    g.add_argument("--base_resolution", default=2.5, type=float, help="res = (crop - 1) / target * base_resolution")
    add_loader_args(g)
    g.add_argument("--gpu_pipeline", action="store_true",
                   help="JPEG decode (nvJPEG), crops and resizes on the training device; CPU workers only read bytes "
                        "and draw the random crops (same seeding and maths; decoder differences on CUDA)")

    g = p.add_argument_group("kNN evaluation")
    g.add_argument("--eval_only", action="store_true", help="run kNN on the (resumed) model and exit")
    g.add_argument("--skip_knn_eval", action="store_true", help="no kNN monitor during training")
    g.add_argument("--knn", default=20, type=int, help="k of the kNN classifier")
    g.add_argument("--knn_ks", nargs="*", type=int, default=None, help="several k at once, e.g. 10 20 100 200")
    g.add_argument("--knn_temperature", default=0.07, type=float, help="vote weight exp(sim / T)")
    g.add_argument("--knn_eval_freq", default=5, type=int, help="kNN before epoch e when e %% freq == 0, and at the end")
    g.add_argument("--eval_dataset", default="resisc", type=str,
                   help="resisc, mlrsnet, airound, cvbrct, eurosat, optimal-31, whu-rs19, ucmerced, fmow (sets the "
                        "normalisation), or demo (built-in synthetic scenes)")
    g.add_argument("--eval_train_fnames", default=None, type=str, help="kNN bank: split list file or ImageFolder")
    g.add_argument("--eval_val_fnames", default=None, type=str, help="kNN queries: split list file or ImageFolder")
    g.add_argument("--eval_path", default=None, type=str, help="ImageFolder root split 90/10 at random (seeded)")
    g.add_argument("--eval_scale", nargs="*", type=int, default=[56, 112, 224], help="evaluation image sides")
    g.add_argument("--eval_gsd", action="store_true", help="res = eval_base_resolution * 224 / eval_scale")
    g.add_argument("--eval_base_resolution", default=1.0, type=float)
    g.add_argument("--eval_batch_size", default=None, type=int, help="default 64 with --eval_only, else 32")
    g.add_argument("--eval_amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast for kNN feature extraction (the original: fp32)")

    g = add_run_args(p, output_dir_help="checkpoints, log.txt, config.yaml, figures",
                     resume_help="checkpoint path or URL to resume from")
    g.add_argument("--checkpoint_interval", default=20, type=int, help="keep checkpoint-{epoch}.pth every n epochs")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help="also save checkpoint-latest.pth every n optimizer steps, resumable mid-epoch (0 = off)")
    g.add_argument("--print_freq", default=20, type=int, help="log every n steps; also the reconstruction figure")

    add_distributed_args(p)

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
def rng_state() -> dict[str, Any]:
    """Plain-data RNG state (loads with weights_only=True) for exact mid-epoch resumption."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": _plain_python_state(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_python_state(state):
    return [state[0], list(state[1]), state[2]]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_model_name(args: argparse.Namespace, checkpoint: Optional[dict]) -> tuple[str, dict]:
    """The factory and kwarg overrides to build: --model, else the checkpoint's args/shapes, else the default."""
    if args.model is not None:
        if args.model not in models_mae.MODELS:
            raise SystemExit(f"--model {args.model!r} is not a pretraining model; choose from {sorted(models_mae.MODELS)}")
        return args.model, {}
    if checkpoint is not None:
        saved = (checkpoint.get("args") or {}).get("model")
        if saved in models_mae.MODELS:
            print(f"--model not given: using {saved} from the checkpoint's saved arguments")
            return saved, {}
        if "model" in checkpoint:
            name, kwargs = models_mae.infer_architecture(checkpoint["model"])
            print(f"--model not given: the checkpoint's tensor shapes identify {name} ({kwargs})")
            return name, kwargs
    return "mae_vit_base_patch16", {}


MODEL_FLAGS = ("decoder_depth", "use_mask_token", "project_pos_emb", "absolute_scale", "fcn_dim", "fcn_layers",
               "independent_fcn_head", "use_l1_loss", "l1_loss_weight", "band_config", "progressive")


def build_model(args: argparse.Namespace, name: str, overrides: dict, in_chans: int) -> models_mae.MaskedAutoencoderViT:
    """The factory with the model flags the user changed (unchanged flags keep the factory's values, which are the
    original's command-line defaults for base/large/huge and smaller heads for the tiny demo model)."""
    defaults = get_args_parser()
    kwargs = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) != defaults.get_default(k)}
    kwargs.update(img_size=args.input_size, in_chans=in_chans, target_size=args.target_size)
    kwargs.update(overrides)
    try:
        return models_mae.MODELS[name](**kwargs)
    except ValueError as err:
        raise SystemExit(f"cannot build {name}: {err}") from None


UNUSED_TABLES = ("pos_embed", "decoder_pos_embed")


def load_model_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    state_dict = strip_module_prefix(state_dict)
    own = model.state_dict()
    for key in UNUSED_TABLES:  # never read in forward: take the checkpoint's, whatever --input_size it was made at
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            getattr(model, key).data = torch.zeros_like(state_dict[key], device=own[key].device)
    problem = describe_state_dict_mismatch(model.state_dict(), state_dict)
    if problem:
        raise SystemExit(f"checkpoint {source} does not match the model (check --model and the model options):\n"
                         f"{problem}")
    model.load_state_dict(state_dict, strict=True)


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


def build_knn_sets(args: argparse.Namespace):
    """kNN bank and query datasets (built only when kNN will run; the original built them even when skipped)."""
    has_source = (args.eval_train_fnames and args.eval_val_fnames) or args.eval_path
    if not has_source and args.eval_dataset != "demo":
        raise SystemExit("kNN evaluation needs --eval_train_fnames and --eval_val_fnames (split list files or "
                         "ImageFolder roots) or --eval_path (an ImageFolder split 90/10); or pass --skip_knn_eval")
    from dataloaders.builders import build_eval_datasets

    return build_eval_datasets(args.eval_dataset, train_fnames=args.eval_train_fnames,
                               val_fnames=args.eval_val_fnames, eval_path=args.eval_path, seed=args.seed)


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


# ------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    device = init_run(args)
    out_dir = Path(args.output_dir)
    if dist_util.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- what to resume from
    resume = args.resume
    if not resume and not args.no_autoresume and (out_dir / "checkpoint-latest.pth").is_file():
        resume = str(out_dir / "checkpoint-latest.pth")
        print(f"autoresume: found {resume}")
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None and "model" not in checkpoint:
        raise SystemExit(f"checkpoint {resume} has no 'model' entry (keys: {sorted(checkpoint)})")

    # --- data
    cfg = None
    in_chans = 3
    if not args.eval_only:
        from dataloaders.config import load_config

        if not Path(args.config).is_file():
            raise SystemExit(f"--config {args.config} not found; pass a data config such as config/fmow.yaml "
                             f"or config/demo.yaml")
        cfg = load_config(args.config, data_root=args.data_root, overrides=args.data_override)
        in_chans = len(cfg["data"]["mean"])
        if float(cfg["data"].get("oversample") or 1.0) != 1.0:
            print(f"WARNING: data.oversample={cfg['data']['oversample']} in {args.config} is not used: the loader batch "
                  f"is --batch_size (GeoTIFF configs filter windows with data.min_valid instead)")
    name, overrides = resolve_model_name(args, checkpoint)
    if "in_chans" in overrides and cfg is None:
        in_chans = overrides.pop("in_chans")
    args.model = name
    patch = 14 if name.endswith("patch14") else 16
    args.patch_size = patch
    if args.target_size is None:
        args.target_size = [32 * args.input_size // patch]
    if args.source_size is None:
        args.source_size = [args.input_size]
    if args.eval_batch_size is None:
        args.eval_batch_size = 64 if args.eval_only else 32

    model = build_model(args, name, overrides, in_chans).to(device)
    apply_model_options(model, args, device)
    eff_batch = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.accum_iter, args.world_size)
    print(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"effective batch {eff_batch}; lr {args.lr:.3g} (blr {args.blr:.3g})")

    param_groups = param_groups_weight_decay(model, args.weight_decay)
    for group in param_groups:  # names are for humans; keep the optimizer's state_dict layout the original's
        group.pop("param_names", None)
        group.pop("name", None)
    optimizer = adamw(param_groups, args.lr, device)
    amp = AmpConfig(args.amp, device)

    start_step = 0
    if checkpoint is not None:
        load_model_weights(model, checkpoint["model"], resume)
        print(f"resumed model weights from {resume}")
        if "optimizer" in checkpoint and "epoch" in checkpoint and not args.eval_only:
            optimizer.load_state_dict(checkpoint["optimizer"])
            amp.load_state_dict(checkpoint.get("scaler"))
            if args.restart:
                args.start_epoch = 0
            elif "resume_step" in checkpoint:
                args.start_epoch, start_step = checkpoint["resume_epoch"], checkpoint["resume_step"]
            else:
                args.start_epoch = checkpoint["epoch"] + 1
            if "rng" in checkpoint and start_step:
                set_rng_state(checkpoint["rng"])
            print(f"resumed optimizer; starting at epoch {args.start_epoch}, step {start_step}")

    knn_due = args.eval_only or not args.skip_knn_eval
    knn_sets = build_knn_sets(args) if knn_due else None

    log_writer = open_log_writer(args.log_dir) if dist_util.is_main_process() and not args.eval_only else None
    if dist_util.is_main_process():
        save_run_config(out_dir, args, cfg, evaluating=args.eval_only)
    warn_dead_flags(args, get_args_parser(), DEAD_FLAGS)

    model_without_ddp = model
    model = eval_model = maybe_compile(model, args)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=True,
        )

    if args.eval_only:
        result = run_knn(args, eval_model, knn_sets, device, None, None)
        dist_util.cleanup()
        return result

    if args.gpu_pipeline:
        from dataloaders.gpu_pipeline import build_gpu_pipeline_loader

        loader, sampler, steps_per_epoch = build_gpu_pipeline_loader(args, cfg, device)
    else:
        loader, sampler, steps_per_epoch = build_train_loader(args, cfg, device)
    if steps_per_epoch == 0:
        raise SystemExit(f"the dataset gives {len(sampler)} samples per process, fewer than --batch_size "
                         f"{args.batch_size}: lower the batch size or add data")
    sampler.set_epoch(args.start_epoch)
    sampler.skip = start_step * args.batch_size
    mean, std = cfg["data"]["mean"], cfg["data"]["std"]
    vis_factor = float(cfg["data"].get("vis_factor", 1.0) or 1.0)

    def visualize(global_step: int, batch_out) -> None:
        from util.visualize import reconstruction_grid, save_reconstruction

        imgs, targets, outputs = batch_out
        fig = reconstruction_grid(model_without_ddp, imgs, targets, outputs[1], outputs[2], mean, std, vis_factor)
        save_reconstruction(fig, out_dir / "vis" / f"step{global_step:08d}.png", log_writer, "reconstruction",
                            global_step)

    def checkpoint_state(epoch_done: int) -> dict:
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_done,
                "scaler": amp.state_dict(), "args": args_to_plain(args)}

    history = []
    epoch_log = JsonlLogger(out_dir)
    results: dict[str, Any] = {}
    with training_run(log_writer):
        for epoch in range(args.start_epoch, args.epochs + 1):
            if knn_due and start_step == 0 and (epoch % args.knn_eval_freq == 0 or epoch == args.epochs):
                results[f"knn_epoch{epoch}"] = run_knn(args, eval_model, knn_sets, device, epoch, log_writer)
            if epoch == args.epochs:
                break
            sampler.set_epoch(epoch)

            def save_mid_epoch(step: int, epoch=epoch) -> None:
                if args.save_every_steps and (step + 1) % args.save_every_steps == 0 and step + 1 < steps_per_epoch \
                        and dist_util.is_main_process():
                    state = checkpoint_state(epoch - 1)
                    state.update(resume_epoch=epoch, resume_step=step + 1, rng=rng_state())
                    save_checkpoint(state, out_dir / "checkpoint-latest.pth")

            stats = train_one_epoch(model, loader, optimizer, device, epoch, amp, args, log_writer,
                                    start_step=start_step, steps_per_epoch=steps_per_epoch,
                                    on_step_end=save_mid_epoch, on_visualize=visualize)
            start_step = 0
            if dist_util.is_main_process():
                save_epoch_checkpoints(checkpoint_state(epoch), out_dir, epoch, args)
            log_stats = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
            history.append(log_stats)
            epoch_log.log(log_stats)  # rank 0 only
            if log_writer is not None:
                log_writer.flush()
    dist_util.cleanup()
    results["history"] = history
    return results


if __name__ == "__main__":
    cli = get_args_parser().parse_args()
    if cli.output_dir:
        Path(cli.output_dir).mkdir(parents=True, exist_ok=True)
    main(cli)
