"""Checkpoints of a training run: which launcher wrote a file, what to resume from, the resumed training state, and
:class:`CheckpointKeeper`, the crash-consistent writer of ``checkpoint-latest.pth``.

Checkpoints record their writer (``checkpoint['writer']``, e.g. ``"main_pretrain"``); a launcher never
autoresumes a checkpoint another launcher wrote (old files without the tag are recognised by their keys).
``CheckpointKeeper`` keeps ``checkpoint-latest.pth`` complete at every instant (atomic writes, ``util.io``) and
*verified*: a state saved after optimizer step k counts as good only once a finite loss has been computed from it
(step k + 1); a non-finite loss puts the previous verified file back (and removes epoch files written from the bad
state) and says which state it is.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from util import dist as dist_util
from util.amp import AmpConfig, NonFiniteLossError
from util.checkpoint import CheckpointError, describe_state_dict_mismatch, load_checkpoint, save_checkpoint, \
    strip_module_prefix
from util.io import TEMP_SUFFIX, link_atomic
from harness.errors import UserError
from harness.run_control import LATEST

__all__ = ["LATEST", "VERIFIED", "OLD_ASIDE", "checkpoint_writer", "checkpoint_kind", "read_checkpoint",
           "find_resume", "rng_state", "set_rng_state", "restore_training_state", "nothing_left", "state_is_finite",
           "CheckpointKeeper", "remove_stale_temp_files", "load_resumed_weights"]

VERIFIED = ".checkpoint-verified.pth"  # the last verified state while checkpoint-latest.pth is not yet verified
OLD_ASIDE = f".{LATEST}.verified.tmp"  # where versions before this one kept it (recovered at start-up)


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
KINDS = {
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
    if writer not in KINDS:
        return None
    what, where = KINDS[writer]
    return f"it is {what}: {where}"


READ_AHEAD: dict[str, dict] = {}  # find_resume's read of checkpoint-latest.pth, handed to the next read_checkpoint


def read_checkpoint(path: str, flag: str) -> dict:
    """``load_checkpoint(path)``; a missing/unreadable/unsafe file is a ``UserError`` naming ``flag``. A file that
    ``find_resume`` just read (to check its writer) is not read a second time."""
    if path in READ_AHEAD:
        return READ_AHEAD.pop(path)
    if str(path).endswith(".safetensors"):  # not a pickle: say what it is rather than "not a PyTorch checkpoint"
        what, where = KINDS["export"]
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
    READ_AHEAD.clear()
    checkpoint = read_checkpoint(str(latest), "autoresume")
    found = checkpoint_writer(checkpoint)
    if found is not None and found != writer:
        raise UserError(f"--output_dir {out_dir} holds {LATEST} written by {found}.py, not {writer}.py: "
                        f"choose another --output_dir (this launcher never resumes or overwrites another's run)")
    print(f"autoresume: found {latest}")
    READ_AHEAD[str(latest)] = checkpoint
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


def load_resumed_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                         check: str = "--model and the model options", unused: Iterable[str] = (),
                         adopt_unused: bool = False) -> None:
    """Load a resumed checkpoint's weights ``state`` (``module.`` prefixes stripped) into ``model``, strictly.

    ``unused``: tensors never read in forward (the positional tables, recomputed from ``res``) that may differ in
    shape when ``--input_size`` changed: the model keeps its own (``adopt_unused``: takes the checkpoint's, so that
    the next save has the original's shape). A mismatch is a ``UserError`` naming ``source`` and ``check``."""
    state = dict(strip_module_prefix(state))
    own = model.state_dict()
    for key in unused:
        if key in state and key in own and state[key].shape != own[key].shape:
            if adopt_unused:
                module_name, _, attr = key.rpartition(".")
                owner = model.get_submodule(module_name) if module_name else model
                getattr(owner, attr).data = torch.zeros_like(state[key], device=own[key].device)
            else:
                state[key] = own[key]
    problem = describe_state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(f"{source} does not match the model (check {check}): {problem}")
    model.load_state_dict(state, strict=True)
