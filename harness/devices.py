"""Process setup of a run: process group, device, seed, CPU threads and DataLoader workers; the optimiser and AMP."""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch

from util import dist as dist_util
from util.amp import AmpConfig
from util.cpu_memory import keep_freed_memory
from harness.errors import UserError

__all__ = ["usable_cores", "local_processes", "default_num_workers", "seed_everything", "resolve_device", "setup",
           "limit_cpu_threads", "build_optimizer", "wrap_ddp"]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # numpy only takes seeds in [0, 2**32)
    random.seed(seed)


def usable_cores() -> int:
    """CPU cores this process may run on (affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this machine (``LOCAL_WORLD_SIZE`` from torchrun/launch, else 1)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_num_workers() -> int:
    """min(10, usable cores per local process - 1): the original's 10 on a GPU node, one core left to compute."""
    return max(0, min(10, usable_cores() // local_processes() - 1))


def resolve_device(name: str) -> torch.device:
    """``--device``, falling back to CPU (with a message) when CUDA is asked for but unavailable."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: running on CPU")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r}: {err}") from None


def limit_cpu_threads(device: torch.device, num_workers: int, local_procs: int = 1) -> None:
    """On CPU, leave a core to each DataLoader worker: oversubscribed OpenMP threads spin and can make a step ten
    times slower (measured on a 2-core machine: 1.5 s instead of 0.14 s for the tiny model)."""
    if device.type != "cpu":
        return
    cores = max(1, usable_cores() // max(1, local_procs))
    threads = max(1, cores - num_workers)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        print(f"CPU: {threads} compute thread(s) per process, {num_workers} DataLoader worker(s)")


def setup(args: argparse.Namespace) -> torch.device:
    """Start the process group (when launched distributed), resolve ``--num_workers``, pick this rank's device,
    seed with ``args.seed + rank``, enable cuDNN autotuning, size the CPU thread pool. Returns the device."""
    if getattr(args, "num_workers", 0) is None:
        args.num_workers = default_num_workers()
    dist_util.init_distributed_mode(args)
    device = resolve_device(args.device)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    seed_everything(args.seed + dist_util.get_rank())  # ranks must not draw the same augmentations
    torch.backends.cudnn.benchmark = True
    limit_cpu_threads(device, getattr(args, "num_workers", 0) or 0, local_processes())
    if device.type == "cpu" and getattr(args, "cpu_allocator", "system") == "reuse":
        # before the model, optimizer and DataLoader workers exist, so that all of them allocate this way
        keep_freed_memory()
    return device


def build_optimizer(param_groups: list[dict], args: argparse.Namespace, device: torch.device,
                    keep_names: bool = False) -> tuple[torch.optim.Optimizer, AmpConfig]:
    """AdamW (betas 0.9/0.95 as the original; the fused kernel on CPU and CUDA, same maths) over ``param_groups``
    at ``args.lr``, and the ``--amp`` configuration (autocast + GradScaler for fp16). Unless ``keep_names``, the
    groups' ``name``/``param_names`` entries are dropped so that the optimizer state has the original's layout."""
    for group in param_groups if not keep_names else ():
        group.pop("param_names", None)
        group.pop("name", None)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=fused or None)
    return optimizer, AmpConfig(args.amp, device)


def wrap_ddp(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, **kwargs) -> torch.nn.Module:
    """``model`` under ``DistributedDataParallel`` when the run is distributed (this rank's GPU on CUDA), else
    ``model``; ``kwargs`` go to DDP (e.g. ``find_unused_parameters``)."""
    if not args.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if device.type == "cuda" else None, **kwargs)
