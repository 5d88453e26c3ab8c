"""The flag groups every launcher shares, with the launcher's own defaults: run, schedule, data + loader,
distributed; and the warning for flags kept only so that original command lines parse."""
from __future__ import annotations

import argparse
from typing import Any, Iterable, Mapping, Optional

from util.amp import add_amp_arg
from util.cpu_memory import ALLOCATOR_CHOICES
from harness.errors import DEBUG_ENV
from harness.run_control import LATEST

__all__ = ["add_run_args", "add_schedule_args", "add_data_args", "add_loader_args", "add_distributed_args",
           "warn_dead_flags", "explicit_flags"]


def add_run_args(parser: argparse.ArgumentParser, *, output_dir_default: str, output_dir_help: str,
                 resume_help: str, checkpoint_interval: Optional[int] = None,
                 print_help: str = "progress line every n steps") -> argparse._ArgumentGroup:
    """The "run" group: output/log dirs, device, seed, CPU allocator, resume, ``--debug``; for a training launcher
    (``checkpoint_interval`` given: its default) also ``--checkpoint_interval``, ``--print_freq`` and
    ``--save_every_steps``. Returns the group."""
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=output_dir_default,
                   help=output_dir_help + (f" (default {output_dir_default})" if output_dir_default else ""))
    g.add_argument("--log_dir", default=None, help="TensorBoard events (default: --output_dir)")
    g.add_argument("--device", default="cuda", help="cuda or cpu; falls back to cpu when CUDA is unavailable "
                                                     "(default cuda)")
    g.add_argument("--seed", default=0, type=int, help="torch/numpy seed, + rank (default 0)")
    g.add_argument("--cpu_allocator", default="reuse", choices=ALLOCATOR_CHOICES,
                   help="on CPU: 'reuse' keeps freed heap memory for the next step (glibc mallopt; ~20%% faster "
                        "ViT-B steps, up to ~15%% higher peak RSS); 'system' keeps glibc's defaults (default reuse)")
    g.add_argument("--resume", default="", help=resume_help)
    g.add_argument("--no_autoresume", action="store_true",
                   help=f"do not continue from --output_dir/{LATEST}")
    g.add_argument("--restart", action="store_true", help="load weights (and optimizer) but start at epoch 0")
    g.add_argument("--start_epoch", default=0, type=int, help="overwritten by resume (default 0)")
    g.add_argument("--debug", action="store_true",
                   help=f"show the traceback of errors (also: environment variable {DEBUG_ENV}=1)")
    if checkpoint_interval is None:
        return g
    g.add_argument("--checkpoint_interval", default=checkpoint_interval, type=int,
                   help=f"keep checkpoint-{{epoch}}.pth every n epochs and the last; {LATEST} always "
                        f"(default {checkpoint_interval})")
    g.add_argument("--print_freq", default=20, type=int, help=f"{print_help} (default 20)")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help=f"also save {LATEST} every n optimizer steps, resumable mid-epoch; SIGTERM/SIGUSR1 "
                        f"save at their step anyway (default 0: off)")
    return g


def _num(value: float) -> str:
    """A default as typed: 1.5e-4, 1e-3, 0.05, 20."""
    if value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def add_schedule_args(group: argparse._ArgumentGroup, *, batch_size: int, epochs: int, blr: float,
                      warmup_epochs: float, warmup_type: type = float, batch_note: str = "",
                      blr_note: str = "") -> None:
    """The optimiser schedule every launcher has, with the launcher's defaults: ``--batch_size --epochs
    --accum_iter --weight_decay --lr --blr --min_lr --warmup_epochs --clip_grad`` and ``--amp``."""
    group.add_argument("--batch_size", default=batch_size, type=int,
                       help=f"per-process batch{batch_note}; effective = batch * accum * world (default {batch_size})")
    group.add_argument("--epochs", default=epochs, type=int, help=f"(default {epochs})")
    group.add_argument("--accum_iter", default=1, type=int,
                       help="gradient accumulation steps per optimizer step (default 1)")
    group.add_argument("--weight_decay", type=float, default=0.05,
                       help="AdamW weight decay of >= 2-D tensors (default 0.05)")
    group.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    group.add_argument("--blr", type=float, default=blr,
                       help=f"base lr: lr = blr * effective batch / 256{blr_note} (default {_num(blr)})")
    group.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule (default 0)")
    group.add_argument("--warmup_epochs", type=warmup_type, default=warmup_epochs,
                       help=f"linear warmup, per iteration (default {_num(warmup_epochs)})")
    group.add_argument("--clip_grad", type=float, default=None,
                       help="clip the global grad norm (default off, as the original)")
    add_amp_arg(group)


def add_data_args(parser: argparse.ArgumentParser, *, default_config: str, config_help: str,
                  root_also: str = "") -> argparse._ArgumentGroup:
    """The "data" group: ``--config`` (default ``config/<default_config>``), ``--data_root``,
    ``--data_override`` and the DataLoader flags (:func:`add_loader_args`). ``root_also`` names further flags whose
    relative paths ``--data_root`` resolves. Returns the group (the launcher adds its augmentation flags)."""
    g = parser.add_argument_group("data")
    g.add_argument("--config", default=None, type=str, help=f"{config_help} (default config/{default_config})")
    g.add_argument("--data_root", default=None, type=str,
                   help=f"folder that relative paths in --config{root_also} resolve against (default: the "
                        f"repository's data/ for the shipped fmow/resisc/eurosat configs, else the config file's "
                        f"folder)")
    g.add_argument("--data_override", nargs="*", default=[], metavar="data.KEY=VALUE",
                   help="override config entries, e.g. data.img_dir=/data/train")
    add_loader_args(g)
    return g


def add_loader_args(group: argparse._ArgumentGroup) -> None:
    """``--num_workers`` (default: min(10, usable cores per process - 1)) and ``--pin_mem``/``--no_pin_mem``."""
    group.add_argument("--num_workers", default=None, type=int,
                       help="DataLoader worker processes (default: min(10, usable CPU cores per process - 1); "
                            "the original's 10 on a GPU node)")
    group.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (default on)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.set_defaults(pin_mem=True)


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "distributed" group (read by ``util.dist.init_distributed_mode``); returns the group."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--world_size", default=1, type=int, help="overwritten by the launcher's environment")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by torch.distributed.launch")
    g.add_argument("--dist_on_itp", action="store_true", help="OpenMPI environment (OMPI_COMM_WORLD_*)")
    g.add_argument("--dist_url", default="env://", help="process group init method (default env://)")
    return g


def warn_dead_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, dead: Mapping[str, str]) -> None:
    """One warning line per flag of ``dead`` (flag -> why it does nothing) that was set to a non-default value."""
    for flag, why in dead.items():
        if getattr(args, flag) != parser.get_default(flag):
            print(f"WARNING: --{flag} has no effect ({why})")


def explicit_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The subset of ``names`` the user set (flags whose unset value is ``None``)."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
