"""The launchers' shared harness: everything ``main_pretrain.py`` and ``main_linprobe.py`` (and any further
launcher) do alike lives here once, so that a fix lands once.

A launcher keeps the MAE shape (``get_args_parser()``, ``main(args)``, a thin engine) and uses, in order::

    parser = get_args_parser()              # harness.add_run_args / add_loader_args / add_distributed_args
    if __name__ == "__main__":
        harness.run(main, parser)           # one-line errors, rank 0 only, --debug / SCALEMAE_DEBUG=1: traceback

    def main(args):
        device = harness.setup(args)                       # process group, device, seed + rank, threads, workers
        out_dir = harness.prepare_output(args, training=not args.eval)  # folders; training: run.lock, cleanup
        resume = harness.find_resume(args, out_dir, WRITER)  # --resume, else autoresume of OUR checkpoint-latest
        checkpoint = harness.read_checkpoint(resume, "--resume") if resume else None
        ...build data and model (validate first, so that nothing is written on bad input)...
        optimizer, amp = harness.build_optimizer(param_groups, args, device)
        start_step = harness.restore_training_state(checkpoint, optimizer, amp, args)
        if harness.nothing_left(args, resume): return ...
        harness.save_run_config(out_dir, args, cfg)       # only now: the run is about to train
        keeper = harness.CheckpointKeeper(out_dir, WRITER)
        with harness.training_run(log_writer, keeper) as stop:   # SIGTERM/SIGUSR1 -> stop.agreed
            ...engine(on_finite_loss=keeper.verify, stop=stop)...; keeper.save(state, "epoch 3", epoch=3, args=args)
            if stop.agreed: harness.stop_preempted(stop, "saved ...")  # exit status 75

Errors. ``UserError`` (a ``SystemExit`` subclass, so ``main(args)`` called from Python still stops with the
message) and the data/config/checkpoint errors are *diagnoses*: ``run`` prints them as ``error: <one line>`` on
rank 0 only and exits with status 2 (1 for a non-finite loss). Anything else is a bug and keeps its traceback.

Checkpoints record their writer (``checkpoint['writer']``, e.g. ``"main_pretrain"``); a launcher never
autoresumes a checkpoint another launcher wrote (old files without the tag are recognised by their keys).
``CheckpointKeeper`` keeps ``checkpoint-latest.pth`` complete at every instant (atomic writes, ``util.io``) and
*verified*: a state saved after optimizer step k counts as good only once a finite loss has been computed from it
(step k + 1); a non-finite loss puts the previous verified file back (and removes epoch files written from the bad
state) and says which state it is. A training run holds ``run.lock`` in its output folder (one run per folder);
SIGTERM/SIGUSR1 stop it at a step boundary with a resumable save and exit status 75 (``training_run``,
``stop_preempted``).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from util import dist as dist_util
from util.amp import AmpConfig, NonFiniteLossError, add_amp_arg
from util.checkpoint import CheckpointError, args_to_plain, load_checkpoint, save_checkpoint
from util.cpu_memory import ALLOCATOR_CHOICES, keep_freed_memory
from util.io import TEMP_SUFFIX, OutputWriteError, link_atomic
from util.run_control import EXIT_PREEMPTED, LockRefused, OutputLock, StopRequest

__all__ = [
    "UserError", "DEBUG_ENV", "ArgumentParser", "run", "report_error", "debug_enabled", "make_folder",
    "add_run_args", "add_schedule_args", "add_loader_args", "add_distributed_args", "warn_dead_flags", "explicit_flags",
    "require", "check_positive",
    "usable_cores", "local_processes", "default_num_workers", "seed_everything", "resolve_device", "setup",
    "limit_cpu_threads",
    "resolve_data_config", "prepare_output", "remove_stale_temp_files", "save_run_config", "open_log_writer",
    "checkpoint_writer", "checkpoint_kind", "find_resume", "read_checkpoint", "restore_training_state", "nothing_left",
    "rng_state", "set_rng_state", "state_is_finite", "CheckpointKeeper", "VERIFIED", "OLD_ASIDE",
    "build_optimizer", "training_run", "stop_preempted", "EXIT_PREEMPTED", "release_output_lock",
]

DEBUG_ENV = "SCALEMAE_DEBUG"
LATEST = "checkpoint-latest.pth"
VERIFIED = ".checkpoint-verified.pth"  # the last verified state while checkpoint-latest.pth is not yet verified
OLD_ASIDE = f".{LATEST}.verified.tmp"  # where versions before this one kept it (recovered at start-up)
_REPO = Path(__file__).resolve().parent.parent  # the launchers live in the repository root


# ====================================================================================================== errors
class UserError(SystemExit):
    """A diagnosis for the user (bad flag, file, data or checkpoint): printed as one line, no traceback.

    A ``SystemExit`` so that ``main(args)`` called from Python or a test stops with the message too.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _user_error_types() -> tuple:
    from dataloaders.config import ConfigError
    from dataloaders.errors import DataError

    return (UserError, ConfigError, DataError, CheckpointError, OutputWriteError, LockRefused, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def _is_rank0() -> bool:
    if dist_util.is_dist_avail_and_initialized():
        return dist_util.is_main_process()
    return os.environ.get("RANK", "0") in ("0", "")


def _one_line(text: str) -> str:
    parts = [p.strip() for p in str(text).strip().splitlines() if p.strip()]
    return "; ".join(parts) if parts else "(no message)"


def report_error(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr, on rank 0 only."""
    if _is_rank0():
        sys.stdout.flush()
        dist_util.ORIGINAL_PRINT(f"error: {_one_line(message)}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (rank 0 only), exit status 2 as argparse's: a mistyped
    flag names the closest flag instead of printing the whole usage. Every launcher and tool parses with it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib

        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [t for t in message[len(prefix):].split() if t.startswith("-")]
            known = [s for s in self._option_string_actions if s.startswith("--")]
            hints = []
            for flag in flags or message[len(prefix):].split()[:1]:
                close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
                hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
            message = f"unknown flag{'s' if len(hints) > 1 else ''} {', '.join(hints)}"
        report_error(f"{message} (--help lists every flag)")
        raise SystemExit(2)


def debug_enabled(args: Optional[argparse.Namespace] = None) -> bool:
    """``--debug`` or the environment variable ``SCALEMAE_DEBUG`` (not empty/0): show tracebacks."""
    env = os.environ.get(DEBUG_ENV, "")
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "False")


def run(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None) -> Any:
    """Command-line entry point of a launcher: parse ``argv``, run ``main(args)``, report user errors.

    User errors (``UserError``, ``SystemExit("message")``, config/data/checkpoint errors, ``ValueError``, missing
    files) become one ``error: ...`` line on rank 0 and exit status 2; a non-finite loss exits with 1 (the
    launcher's ``training_run`` prints it). With ``--debug`` or ``SCALEMAE_DEBUG=1`` the exception propagates with
    its traceback. Returns ``main``'s result.
    """
    args = parser.parse_args(argv)
    try:
        return main(args)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            raise
        _report(exc, str(exc.code), args)
        raise SystemExit(2) from None
    except KeyboardInterrupt as exc:
        _report(exc, f"interrupted (Ctrl-C): stopped at once; {LATEST} in --output_dir holds the last complete save "
                     f"(saves are atomic), rerun the same command to resume from it", args)
        raise SystemExit(130) from None
    except _user_error_types() as exc:
        _report(exc, str(exc) or type(exc).__name__, args)
        raise SystemExit(2) from None
    except Exception:
        if _is_rank0() or dist_util.is_dist_avail_and_initialized():
            traceback.print_exc()
        _cleanup_quietly()
        raise SystemExit(1) from None
    finally:
        release_output_lock()


def _report(exc: BaseException, message: str, args: argparse.Namespace) -> None:
    """The one ``error:`` line (rank 0), preceded by the traceback with ``--debug`` / ``SCALEMAE_DEBUG=1``."""
    if debug_enabled(args) and _is_rank0():
        traceback.print_exception(exc)
    report_error(message)
    _cleanup_quietly()


def _cleanup_quietly() -> None:
    try:
        dist_util.cleanup()
    except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
        pass


# ======================================================================================================= flags
def add_run_args(parser: argparse.ArgumentParser, *, output_dir_default: str, output_dir_help: str,
                 resume_help: str) -> argparse._ArgumentGroup:
    """The "run" group: output/log dirs, device, seed, CPU allocator, resume, ``--debug``. Returns the group."""
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


# ================================================================================================== validation
def require(condition: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``condition``."""
    if not condition:
        raise UserError(message)


def check_positive(args: argparse.Namespace, *names: str, allow_zero: Sequence[str] = ()) -> None:
    """Every flag of ``names`` (unset ``None`` skipped, lists checked element-wise) must be > 0 (>= 0 for
    ``allow_zero``)."""
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            ok = v >= 0 if name in allow_zero else v > 0
            if not ok or (isinstance(v, float) and not math.isfinite(v)):
                bound = ">= 0" if name in allow_zero else "> 0"
                raise UserError(f"--{name} {v}: must be {bound}")


# ======================================================================================================= setup
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


# ======================================================================================================== data
SHIPPED_CONFIGS = _REPO / "config"
DEFAULT_DATA_ROOT = _REPO / "data"


_DATA_FOLDER_TYPES = ("fmow", "resisc", "eurosat")  # the original's image-folder configs, read from its data/


def resolve_data_config(args: argparse.Namespace, default: str) -> str:
    """Resolve ``--config`` (unset: the shipped ``config/<default>``; a relative path that does not exist from the
    working directory is also tried under the repository) and, for the shipped image-folder configs (fmow, resisc,
    eurosat), default ``--data_root`` to the repository's ``data/`` folder -- the original README's
    ``ln -s ~/data/fmow-rgb data``. Other configs keep their rule (relative to the file's folder). Sets
    ``args.config``/``args.data_root``; returns the config path. A missing file is a ``UserError``."""
    given = args.config
    path = Path(os.path.expanduser(given)) if given else SHIPPED_CONFIGS / default
    if given and not path.is_file() and not path.is_absolute() and (_REPO / path).is_file():
        path = _REPO / path
    if not path.is_file():
        shipped = ", ".join(f"config/{p.name}" for p in sorted(SHIPPED_CONFIGS.glob("*.yaml")))
        raise UserError(f"--config {given or path}: file not found (shipped: {shipped})")
    args.config = str(path)
    if args.data_root is None and path.resolve().parent == SHIPPED_CONFIGS.resolve():
        import yaml

        try:
            kind = str(((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("type", "")).lower()
        except (yaml.YAMLError, AttributeError, OSError):
            kind = ""  # load_config reports the problem with the file and key
        if kind in _DATA_FOLDER_TYPES:
            args.data_root = str(DEFAULT_DATA_ROOT)
            print(("--config not given: using " if not given else "") + f"config/{path.name}: relative paths "
                  f"resolve against {DEFAULT_DATA_ROOT} (the original README's `ln -s ~/data/fmow-rgb data`; "
                  f"--data_root changes it)")
    return args.config


# ===================================================================================================== outputs
def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Start-up cleanup of a training run's folder (called with its lock held). A good state that an older version
    left only under ``.checkpoint-latest.pth.verified.tmp`` is recovered (renamed back to ``checkpoint-latest.pth``,
    or kept as the verified fallback when ``checkpoint-latest.pth`` exists), saying so in one line. Then the
    ``.checkpoint-*.tmp`` files are removed: temporary files of interrupted saves (GBs each at ViT-L), which are
    never the only copy of a good state (``checkpoint-latest.pth`` is replaced only by a complete, fsynced file).
    Returns the removed files."""
    latest = out_dir / LATEST
    for old in (out_dir / OLD_ASIDE, out_dir / VERIFIED):
        if not old.is_file():
            continue
        if not latest.exists():
            os.replace(old, latest)
            print(f"recovered {latest} from {old.name}, the only copy of the last good state (left by an "
                  f"interrupted save of an earlier version, or {LATEST} was deleted)")
        elif old.name == OLD_ASIDE:  # the earlier version's fallback of an unverified latest file: keep it as ours
            os.replace(old, out_dir / VERIFIED)
    removed = []
    for path in out_dir.glob(f".checkpoint-*{TEMP_SUFFIX}"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        print(f"removed {len(removed)} temporary file(s) of interrupted checkpoint saves in {out_dir}")
    return removed


_LOCK: Optional[OutputLock] = None


def release_output_lock() -> None:
    """Give up this process's lock of its output folder (at exit; ``run`` calls it, and ``atexit``)."""
    global _LOCK
    if _LOCK is not None:
        _LOCK.release()
        _LOCK = None


atexit.register(release_output_lock)


def _take_output_lock(out_dir: Path) -> None:
    """Rank 0 takes ``out_dir/run.lock``; every rank learns whether it was refused (one collective under DDP), so
    that all stop together with rank 0's one line."""
    global _LOCK
    refused: Optional[LockRefused] = None
    if dist_util.is_main_process():
        release_output_lock()
        lock = OutputLock(out_dir)
        try:
            lock.acquire()
            _LOCK = lock
        except LockRefused as err:
            refused = err
    if dist_util.get_world_size() > 1:
        if dist_util.all_reduce_means([1.0 if refused else 0.0])[0] > 0 and refused is None:
            raise UserError(f"--output_dir {out_dir} is used by another run (rank 0 says which)")
    if refused is not None:
        raise refused


def prepare_output(args: argparse.Namespace, training: bool = True) -> Path:
    """``--log_dir`` defaults to ``--output_dir``; on rank 0 create the output folder. A training run then takes the
    folder's lock (``run.lock``: one training run per folder; refused with one line before anything is written) and
    cleans up after interrupted saves (:func:`remove_stale_temp_files`). An evaluation run (``training=False``)
    takes no lock and removes nothing: it may read a folder where training runs, and never writes checkpoints.
    Returns the output folder."""
    if not args.output_dir:
        raise UserError("--output_dir is empty: give a folder for checkpoints and logs")
    out_dir = Path(args.output_dir)
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} exists and is not a folder")
    if dist_util.is_main_process():
        make_folder(out_dir, "--output_dir")
    if training:
        _take_output_lock(out_dir)
        if dist_util.is_main_process():
            remove_stale_temp_files(out_dir)
    return out_dir


def _os_reason(err: OSError) -> str:
    """The OS's words for an ``OSError`` (``No space left on device``, ``Read-only file system``, ...)."""
    return err.strerror or type(err).__name__


def make_folder(path: str | os.PathLike, flag: str) -> Path:
    """``mkdir -p path``; any ``OSError`` (read-only, a file in the way, no space, no permission) is a
    ``UserError`` naming ``flag`` and the folder. Returns the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {path}: exists and is not a folder") from None
    except OSError as err:
        where = f" ({err.filename})" if err.filename and os.fspath(err.filename) != os.fspath(path) else ""
        raise UserError(f"{flag} {path}: cannot create the folder: {_os_reason(err)}{where}") from None
    return path


def save_run_config(out_dir: str | os.PathLike, args: argparse.Namespace, cfg: Optional[Mapping],
                    evaluating: bool = False, **extra: Any) -> Optional[Path]:
    """Write the resolved arguments, the data config's ``data`` section and ``extra`` to ``out_dir/config.yaml``
    (``config_eval.yaml`` when ``evaluating``) and a copy to ``out_dir/configs/<start time>.yaml`` (one per start:
    the history of a resumed run). Call it only when the run is about to start (rank 0 only writes)."""
    if not dist_util.is_main_process():
        return None
    from dataloaders.config import save_config

    resolved = {"args": args_to_plain(args), "data": (cfg or {}).get("data"), **extra}
    name = "config_eval" if evaluating else "config"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    try:
        save_config(resolved, Path(out_dir) / "configs" / f"{name}-{stamp}.yaml")
        return save_config(resolved, Path(out_dir) / f"{name}.yaml")
    except OSError as err:
        raise UserError(f"--output_dir {out_dir}: cannot write {name}.yaml: {_os_reason(err)}") from None


def open_log_writer(log_dir: str | os.PathLike):
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (created if needed)."""
    from torch.utils.tensorboard import SummaryWriter  # slow import: only on the rank that logs

    make_folder(log_dir, "--log_dir")
    return SummaryWriter(log_dir=log_dir)


# ================================================================================================= checkpoints
def checkpoint_writer(checkpoint: Mapping) -> Optional[str]:
    """The launcher that wrote a checkpoint: its ``writer`` entry, else recognised from the keys of old files
    (``main_pretrain``: decoder tensors; ``main_linprobe``: a BatchNorm+Linear ``head.1``), else None."""
    writer = checkpoint.get("writer")
    if isinstance(writer, str):
        return writer
    model = checkpoint.get("model")
    if isinstance(model, Mapping):
        keys = {k[len("module."):] if k.startswith("module.") else k for k in model}
        if "decoder_embed.weight" in keys:
            return "main_pretrain"
        if "head.1.weight" in keys:
            return "main_linprobe"
    return None


# what each launcher's checkpoint is, and where it goes
_KINDS = {
    "main_pretrain": ("a pretraining checkpoint of main_pretrain.py",
                      "main_pretrain.py --resume continues it; main_linprobe.py and main_segment.py take it as "
                      "--checkpoint_path"),
    "main_linprobe": ("a linear-probe/finetune checkpoint of main_linprobe.py",
                      "main_linprobe.py --resume continues it (--eval --resume evaluates it)"),
    "main_segment": ("a segmentation checkpoint of main_segment.py",
                     "main_segment.py --resume continues it (--eval --resume evaluates it)"),
    "export": ("an encoder exported by tools/export_encoder.py",
               "main_linprobe.py and main_segment.py take it as --checkpoint_path"),
}


def checkpoint_kind(checkpoint: Mapping) -> Optional[str]:
    """What a checkpoint is and which launcher/flag takes it (one sentence), from its ``writer`` (or keys); an
    exported encoder is a bare state dict with encoder tensors and no decoder. None when it is none of these."""
    writer = checkpoint_writer(checkpoint)
    if writer is None and "model" not in checkpoint and "patch_embed.proj.weight" in checkpoint \
            and not any(str(k).startswith("decoder") for k in checkpoint):
        writer = "export"
    if writer not in _KINDS:
        return None
    what, where = _KINDS[writer]
    return f"it is {what}: {where}"


_READ_AHEAD: dict[str, dict] = {}  # find_resume's read of checkpoint-latest.pth, handed to the next read_checkpoint


def read_checkpoint(path: str, flag: str) -> dict:
    """``load_checkpoint(path)``; a missing/unreadable/unsafe file is a ``UserError`` naming ``flag``. A file that
    ``find_resume`` just read (to check its writer) is not read a second time."""
    if path in _READ_AHEAD:
        return _READ_AHEAD.pop(path)
    if str(path).endswith(".safetensors"):  # not a pickle: say what it is rather than "not a PyTorch checkpoint"
        what, where = _KINDS["export"]
        raise UserError(f"{flag} {path}: it is {what} (.safetensors): {where}")
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, CheckpointError) as err:
        raise UserError(f"{flag}: {err}") from None


def find_resume(args: argparse.Namespace, out_dir: Path, writer: str) -> Optional[str]:
    """What to resume from: ``--resume``; else (unless ``--no_autoresume``) ``out_dir/checkpoint-latest.pth`` if
    ``writer`` wrote it. A checkpoint of another launcher there is an error (it would be overwritten)."""
    if args.resume:
        return args.resume
    latest = out_dir / LATEST
    if args.no_autoresume or not latest.is_file():
        return None
    _READ_AHEAD.clear()
    checkpoint = read_checkpoint(str(latest), "autoresume")
    found = checkpoint_writer(checkpoint)
    if found is not None and found != writer:
        raise UserError(f"--output_dir {out_dir} holds {LATEST} written by {found}.py, not {writer}.py: "
                        f"choose another --output_dir (this launcher never resumes or overwrites another's run)")
    print(f"autoresume: found {latest}")
    _READ_AHEAD[str(latest)] = checkpoint
    return str(latest)


def rng_state() -> dict[str, Any]:
    """Plain-data RNG state (loads with weights_only=True) for exact mid-epoch resumption."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(checkpoint: Optional[Mapping], optimizer: torch.optim.Optimizer, amp: AmpConfig,
                           args: argparse.Namespace, source: str = "") -> int:
    """Optimizer, scaler, epoch (and mid-epoch step + RNG) from a training checkpoint; sets ``args.start_epoch``
    (0 with ``--restart``) and returns the step to start at. Weights-only checkpoints change nothing (returns 0)."""
    if checkpoint is None or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        return 0
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as err:
        raise UserError(f"{source or 'checkpoint'}: its optimizer state does not fit this run (another model or "
                        f"linear probe vs --finetune?): {err}") from None
    amp.load_state_dict(checkpoint.get("scaler"))
    start_step = 0
    if args.restart:
        args.start_epoch = 0
    elif "resume_step" in checkpoint:
        args.start_epoch, start_step = int(checkpoint["resume_epoch"]), int(checkpoint["resume_step"])
    else:
        args.start_epoch = int(checkpoint["epoch"]) + 1
    if "rng" in checkpoint and start_step:
        set_rng_state(checkpoint["rng"])
    print(f"resumed optimizer; starting at epoch {args.start_epoch}, step {start_step}")
    return start_step


def nothing_left(args: argparse.Namespace, resume: Optional[str], start_step: int = 0) -> bool:
    """True (and says so) when the resumed run has already finished ``--epochs``."""
    if resume and start_step == 0 and args.start_epoch >= args.epochs:
        print(f"nothing left to do: {resume} finished epoch {args.start_epoch - 1} and --epochs is {args.epochs} "
              f"(raise --epochs to train on, or use another --output_dir / --no_autoresume to start over)")
        return True
    return False


def state_is_finite(state: Mapping[str, Any]) -> bool:
    """Every floating-point tensor of a (nested) state dict is finite."""
    for value in state.values():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return False
        elif isinstance(value, Mapping) and not state_is_finite(value):
            return False
    return True


class CheckpointKeeper:
    """Rank 0's writer of ``checkpoint-latest.pth`` and ``checkpoint-{epoch}.pth``: once a run has saved,
    ``checkpoint-latest.pth`` is a complete checkpoint at every instant, and a state whose loss is not known to be
    finite is never the one left to resume after a non-finite loss.

    Every file is written by ``util.io`` (temporary file, fsync, ``os.replace``), so a crash, SIGKILL or full disk
    at any moment leaves the previous complete file. ``save(state, label)`` refuses non-finite weights, stamps
    ``state['writer']``, and before replacing a *verified* ``checkpoint-latest.pth`` gives it a second name,
    ``.checkpoint-verified.pth`` (a hard link, made atomically); then it replaces ``checkpoint-latest.pth``. The
    engine calls ``verify()`` after every finite loss: the saved state produced it, so the second name is dropped.
    ``reject()`` (a non-finite loss) moves ``.checkpoint-verified.pth`` back over ``checkpoint-latest.pth`` (one
    ``os.replace``), removes epoch files written from the bad state and returns a sentence saying what
    ``checkpoint-latest.pth`` now holds. A run that starts with both files (the last one was interrupted before
    its latest state was verified) resumes the latest state and keeps the verified one as its fallback. On other
    ranks only the finiteness check of ``save`` runs (a collective: every rank calls ``save``); every other call
    is a no-op there.
    """

    def __init__(self, out_dir: str | os.PathLike, writer: str) -> None:
        self.out_dir = Path(out_dir)
        self.writer = writer
        self.enabled = dist_util.is_main_process()
        self.latest = self.out_dir / LATEST
        self.aside = self.out_dir / VERIFIED
        self.pending: Optional[str] = None  # label of the unverified latest file
        self.pending_files: list[Path] = []
        self.verified: Optional[str] = "the checkpoint from before this run" if self.latest.is_file() else None
        if self.enabled and self.latest.is_file() and self.aside.is_file():
            self.pending = "the state the interrupted run saved last"
            self.verified = "the last verified state of the interrupted run"

    def save(self, state: dict, label: str, epoch: Optional[int] = None,
             args: Optional[argparse.Namespace] = None) -> None:
        """Save ``state`` as latest (and as ``checkpoint-{epoch}.pth`` every ``args.checkpoint_interval`` epochs
        and at the last one)."""
        bad_ranks = self._count_non_finite(state)
        if bad_ranks:
            world = dist_util.get_world_size()
            where = f" on {bad_ranks} of {world} ranks" if 0 < bad_ranks < world else ""
            raise NonFiniteLossError(f"the weights became non-finite at {label}{where}; not saved")
        if not self.enabled:
            return
        state = {**state, "writer": self.writer, "state_label": label}
        if self.pending is None and self.latest.is_file():
            link_atomic(self.latest, self.aside)  # the verified state keeps a name of its own
        save_checkpoint(state, self.latest)
        self.pending = label
        if epoch is not None and args is not None and (epoch % args.checkpoint_interval == 0
                                                       or epoch + 1 == args.epochs):
            path = self.out_dir / f"checkpoint-{epoch}.pth"
            link_atomic(self.latest, path)  # the same bytes: a second name, not a second write
            self.pending_files.append(path)

    @staticmethod
    def _count_non_finite(state: dict) -> int:
        """On how many ranks ``state['model']`` holds a non-finite value. Collective under a process group: every
        rank learns the same count, so all ranks raise together (rank 0 prints the error once, the others exit as
        quietly) instead of rank 0 stopping alone and leaving the others in their next collective."""
        bad = 0 if state_is_finite(state.get("model", {})) else 1
        if dist_util.get_world_size() > 1:
            import torch.distributed as dist

            flag = torch.tensor([bad], dtype=torch.int32, device=dist_util.comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.SUM)
            bad = int(flag.item())
        return bad

    def verify(self) -> None:
        """A finite loss came from the latest saved state: it is good."""
        if self.pending is None:
            return
        self.verified, self.pending, self.pending_files = self.pending, None, []
        if self.enabled:
            with contextlib.suppress(FileNotFoundError):
                self.aside.unlink()

    def reject(self) -> str:
        """Undo the unverified saves after a non-finite loss; returns what ``checkpoint-latest.pth`` holds now."""
        if not self.enabled:
            return ""
        if self.pending is not None:
            bad = self.pending
            for path in self.pending_files:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if self.aside.is_file():
                os.replace(self.aside, self.latest)
            else:  # no verified state of this run or before it
                with contextlib.suppress(FileNotFoundError):
                    self.latest.unlink()
            self.pending, self.pending_files = None, []
            if self.verified is None:
                return (f"The state saved at {bad} gave this loss, so it was removed; no state of this run is "
                        f"known to be good: {self.latest} does not exist.")
            return (f"The state saved at {bad} gave this loss and was removed: {self.latest} holds {self.verified}, "
                    f"the last state whose loss was finite.")
        if self.verified is None:
            return f"No checkpoint was written ({self.latest} does not exist)."
        return f"{self.latest} holds {self.verified}, the last state whose loss was finite (untouched)."

    def holding(self) -> str:
        """What ``checkpoint-latest.pth`` holds, in words (for the stop message)."""
        label = self.pending or self.verified
        if not self.enabled:
            return ""
        return f"{self.latest} holds {label}" if label and self.latest.is_file() else "nothing was saved yet"

    def finish(self) -> None:
        """End of training: the final state has no next loss; it was checked finite when saved."""
        if self.enabled:
            with contextlib.suppress(FileNotFoundError):
                self.aside.unlink()
            self.pending, self.pending_files = None, []


def stop_preempted(stop: StopRequest, what: str) -> None:
    """End a run stopped by SIGTERM/SIGUSR1: one line (rank 0) saying ``what`` was saved, then exit status 75
    (``EXIT_PREEMPTED``, EX_TEMPFAIL) on every rank, which a requeue script tests."""
    if _is_rank0():
        sys.stdout.flush()
        signame = stop.signal_name or "a stop signal on another rank"
        dist_util.ORIGINAL_PRINT(f"stopped by {signame}: {what}; rerun the same command to resume "
                                  f"(exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    _cleanup_quietly()
    raise SystemExit(EXIT_PREEMPTED)


# =================================================================================================== optimizer
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


# ======================================================================================================== loop
@contextlib.contextmanager
def training_run(log_writer: Any = None, keeper: Optional[CheckpointKeeper] = None) -> Iterator[StopRequest]:
    """Context of a training loop; yields the run's :class:`StopRequest` (SIGTERM/SIGUSR1 handlers installed for
    its duration: pass it to the engine and end with :func:`stop_preempted` once ``stop.agreed``). A
    ``NonFiniteLossError`` makes ``keeper`` undo unverified saves and becomes one ``error:`` line (rank 0) and exit
    status 1; ``log_writer`` is closed however the loop ends; the training time is printed when it ends normally."""
    start = time.time()
    stop = StopRequest().install()
    try:
        yield stop
    except NonFiniteLossError as err:
        note = keeper.reject() if keeper is not None else ""
        report_error(f"{err} {note} Try a lower --blr, --amp bf16 instead of fp16, or --clip_grad.")
        _cleanup_quietly()
        raise SystemExit(1) from None
    finally:
        stop.restore()
        if log_writer is not None:
            log_writer.close()
    if keeper is not None:
        keeper.finish()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start))}")
