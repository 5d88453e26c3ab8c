"""Distributed-training helpers: process-group setup and small collective utilities.

``init_distributed_mode(args)`` works out the rank layout from the launcher's environment and, only when more
than one process takes part, starts a ``torch.distributed`` process group. Every other helper degrades to a
sensible single-process answer when no process group exists, so training and evaluation code can call them
unconditionally.

Launchers recognised, in this order:

1. ``--dist_on_itp`` (OpenMPI): ``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK`` plus ``MASTER_ADDR``/``MASTER_PORT``.
2. ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (``torchrun``; ``python -m torch.distributed.launch``, which may also pass
   ``--local-rank=N`` that the script stores in ``args.local_rank``).
3. SLURM: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` defaults to the first host of
   ``SLURM_NODELIST`` (or ``SLURM_JOB_NODELIST``), ``MASTER_PORT`` to 29500. Note that inside an ``sbatch`` script
   that was *not* started through ``srun``, SLURM still sets these variables; launch with ``srun`` (one task per
   GPU) or with ``torchrun`` (whose ``RANK`` takes precedence).
4. Otherwise a single process: ``distributed=False``, rank 0, world size 1, no process group.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import re
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

__all__ = [
    "init_distributed_mode",
    "is_dist_avail_and_initialized",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "comm_device",
    "barrier",
    "all_reduce_mean",
    "all_reduce_means",
    "gather_tensors_variable",
    "cleanup",
    "first_host_from_nodelist",
    "setup_for_distributed",
    "ShardSampler",
    "no_sync",
]

DEFAULT_MASTER_PORT = "29500"
_MAX_GATHER_DIMS = 8
ORIGINAL_PRINT = builtins.print  # the real print, before setup_for_distributed replaces it


# --------------------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    """True when ``torch.distributed`` is built in and a process group has been initialised."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0 (and always in a single process)."""
    return get_rank() == 0


def comm_device() -> torch.device:
    """Device on which collective tensors must live for the active backend (CUDA for NCCL, else CPU)."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------
def setup_for_distributed(is_master: bool, rank: int | None = None) -> None:
    """Replace ``builtins.print`` so that only the master process prints.

    Any process can still print with ``print(..., force=True)``. Printed lines are prefixed with a timestamp
    (and with the rank when a non-master process forces output). ``cleanup()`` restores the original print.
    """
    rank = get_rank() if rank is None else rank

    def _print(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
            prefix = f"[{stamp}]" if is_master else f"[{stamp} rank {rank}]"
            ORIGINAL_PRINT(prefix, *args, **kwargs)

    builtins.print = _print


def _restore_print() -> None:
    builtins.print = ORIGINAL_PRINT


# --------------------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------------------
def first_host_from_nodelist(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``"gpu[003-005,9],cpu1"`` (-> ``"gpu003"``).

    Handles several bracketed ranges (``"n[1-2]-ib[3-4]"`` -> ``"n1-ib3"``) and keeps zero padding.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM node list is empty; set MASTER_ADDR explicitly")
    # first top-level comma-separated entry (commas inside brackets do not split hosts)
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]

    def _first(match: re.Match) -> str:
        first_item = match.group(1).split(",")[0]
        return first_item.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", _first, entry)
    if "[" in host or "]" in host or not host:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR explicitly")
    return host


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _detect_layout(args: Any) -> tuple[int, int, int | None, str]:
    """Return ``(rank, world_size, local_rank or None, source)`` from ITP, torchrun/launch or SLURM env vars."""
    env = os.environ
    if getattr(args, "dist_on_itp", False):
        for name in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
            if name not in env:
                raise RuntimeError(f"--dist_on_itp is set but environment variable {name} is missing")
        return (_env_int("OMPI_COMM_WORLD_RANK"), _env_int("OMPI_COMM_WORLD_SIZE"),
                _env_int("OMPI_COMM_WORLD_LOCAL_RANK"), "itp")
    if "RANK" in env and "WORLD_SIZE" in env:
        local: int | None = _env_int("LOCAL_RANK") if "LOCAL_RANK" in env else None
        if local is None:
            cli_local = getattr(args, "local_rank", None)
            if cli_local is not None and int(cli_local) >= 0:
                local = int(cli_local)
        return _env_int("RANK"), _env_int("WORLD_SIZE"), local, "env"
    if "SLURM_PROCID" in env:
        rank = _env_int("SLURM_PROCID")
        if "SLURM_NTASKS" in env:
            world = _env_int("SLURM_NTASKS")
        else:
            world = int(getattr(args, "world_size", 1) or 1)
        local = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in env else None
        if world > 1 and "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise RuntimeError("SLURM launch without MASTER_ADDR or SLURM_NODELIST; cannot find the master host")
            env["MASTER_ADDR"] = first_host_from_nodelist(nodelist)
        if world > 1:
            env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        return rank, world, local, "slurm"
    return 0, 1, None, "single"


def _choose_backend(args: Any) -> str:
    device = str(getattr(args, "device", "cuda") or "cuda")
    return "nccl" if (torch.cuda.is_available() and device.startswith("cuda")) else "gloo"


def init_distributed_mode(args: Any) -> None:
    """Detect the launcher, set the rank attributes on ``args`` and start a process group if needed.

    Sets ``args.distributed`` (True only when world size > 1), ``args.rank``, ``args.world_size``, ``args.gpu``
    (the local rank; with NCCL taken modulo the number of visible GPUs) and ``args.dist_backend`` (``"nccl"``
    when CUDA is available and ``args.device`` starts with ``"cuda"``, else ``"gloo"``). ``args.dist_url``
    (default ``"env://"``) is the init method. With NCCL the current CUDA device is set to the local rank. In
    distributed mode non-master processes stop printing (``print(..., force=True)`` still prints).
    """
    rank, world_size, local_rank, source = _detect_layout(args)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid distributed layout from {source} launcher: rank {rank}, world size {world_size}")
    backend = _choose_backend(args)
    n_gpu = torch.cuda.device_count() if backend == "nccl" else 0
    if local_rank is None:
        local_rank = rank % n_gpu if n_gpu > 0 else 0
    elif n_gpu > 0 and local_rank >= n_gpu:
        # e.g. SLURM binding one GPU per task: every task sees device 0 while SLURM_LOCALID counts up
        local_rank = local_rank % n_gpu

    args.rank = rank
    args.world_size = world_size
    args.gpu = local_rank
    args.dist_backend = backend
    args.distributed = world_size > 1
    if getattr(args, "dist_url", None) is None:
        args.dist_url = "env://"

    if backend == "nccl":
        torch.cuda.set_device(local_rank)

    if not args.distributed:
        return

    # make env:// work for every launcher (ITP and SLURM only set their own variable names)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(local_rank)
    if args.dist_url == "env://":
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(f"distributed launch ({source}) with world size {world_size} needs environment "
                               f"variable(s) {', '.join(missing)} for init method env://")

    print(f"| distributed init (rank {rank}/{world_size}, local {local_rank}, {source}, {backend}): "
          f"{args.dist_url}", flush=True)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world_size, rank=rank,
                            **kwargs)
    barrier()
    setup_for_distributed(rank == 0, rank)


def cleanup(wait_for_all: bool = True) -> None:
    """Destroy the process group (if any) and restore the builtin ``print``.

    On a normal end (``wait_for_all``) every rank first meets at a barrier: a rank that tears gloo down while a
    peer is still finishing its last collective can be aborted by the C++ runtime ("terminate called without an
    active exception", a non-zero exit after a successful run). Error paths pass ``wait_for_all=False`` (the
    other ranks may never arrive)."""
    if is_dist_avail_and_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
    _restore_print()


def no_sync(model: torch.nn.Module, skip: bool) -> Any:
    """``model.no_sync()`` (DDP: this backward does not all-reduce gradients) when ``skip``, else a null context:
    gradient accumulation all-reduces only on the micro-step that steps the optimizer."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------------------
def barrier() -> None:
    """Synchronise all processes; a no-op without a process group."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Mean of a Python scalar over all processes (the value itself when not distributed)."""
    return all_reduce_means([value])[0]


def all_reduce_means(values: Sequence[float]) -> list[float]:
    """Element-wise mean of Python scalars over all processes, in one collective (the values when not
    distributed). Every rank must pass the same number of values."""
    world = get_world_size()
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [v / world for v in t.tolist()]


def gather_tensors_variable(t: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose first dimension differs between ranks.

    Every rank receives the concatenation (along dim 0, in rank order) of all ranks' tensors, with no padding
    left in the result. Trailing dimensions and dtype must agree across ranks. Without a process group the
    input is returned unchanged. The result lives on the input's device.
    """
    world = get_world_size()
    if world == 1:
        return t
    if t.dim() == 0:
        raise ValueError("gather_tensors_variable needs a tensor with at least one dimension, got a scalar")
    comm = comm_device()
    orig_device, orig_dtype = t.device, t.dtype
    x = t.detach().to(comm)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    x = x.contiguous()

    if x.dim() > _MAX_GATHER_DIMS:
        raise ValueError(f"gather_tensors_variable supports up to {_MAX_GATHER_DIMS} dimensions, got {x.dim()}")
    header = [x.dim(), *x.shape] + [0] * (_MAX_GATHER_DIMS - x.dim())
    shape = torch.tensor(header, dtype=torch.int64, device=comm)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_l = [s.tolist() for s in shapes]
    trailing = [tuple(s[2:1 + s[0]]) for s in shapes_l]
    if any(s[0] != x.dim() for s in shapes_l) or len(set(trailing)) != 1:
        got = {r: tuple(s[1:1 + s[0]]) for r, s in enumerate(shapes_l)}
        raise ValueError(f"gather_tensors_variable: all ranks need the same trailing shape, got per rank {got}")
    sizes = [s[1] for s in shapes_l]
    max_rows = max(sizes)

    padded = x.new_zeros((max_rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded)
    out = torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0)
    return out.to(device=orig_device, dtype=orig_dtype)


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------
class ShardSampler(Sampler[int]):
    """Sequential shard of a dataset for one rank, **without padding**: rank r of W gets indices r, r + W, ...

    Every sample is evaluated exactly once over all ranks (torch's DistributedSampler repeats samples to even out
    the shards, which biases the accuracy); ranks may get one sample less than others. ``num_replicas`` and
    ``rank`` default to the current process group's (1 and 0 without one).
    """

    def __init__(self, dataset: Dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        self.length = len(dataset)  # type: ignore[arg-type]
        self.num_replicas = int(num_replicas) if num_replicas is not None else get_world_size()
        self.rank = int(rank) if rank is not None else get_rank()

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))
