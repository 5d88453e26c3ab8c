"""The training-run skeleton every launcher uses: the optimiser with its resumed state, the epoch loop with the
checkpoint keeper, the stop on SIGTERM/SIGUSR1, the non-finite-loss exit, the log, and the evaluate-only tail.

A launcher's ``main()`` wires its hooks into it::

    optimizer, amp, start_step = harness.start_optimizer(param_groups, args, device, resumed, resume)
    if start_step is None: return ...                             # --epochs already done
    run = harness.TrainingRun(args, out_dir, WRITER, cfg)         # config.yaml, TensorBoard, keeper, log.txt
    history = run.train(train_epoch=lambda epoch, stop: ..., state=lambda epoch: {...}, evaluate=...)

``TrainingRun.train`` runs, for each epoch from ``args.start_epoch``: ``before_epoch(epoch)`` (also once more with
``epoch == args.epochs``, e.g. a kNN monitor), ``train_epoch(epoch, stop)`` -> stats, ``evaluate(epoch)`` -> log
entries, ``keeper.save(state(epoch))``, one ``log.txt`` line. A stop agreed during an epoch exits with status 75.

Mid-epoch saves (every launcher): the engine calls ``run.step_saver(epoch, steps_per_epoch)`` after each optimizer
step; it saves a resumable state (``resume_epoch``, ``resume_step``, the RNG state) every ``--save_every_steps``
steps and at the step where a stop was agreed, after which ``train`` exits 75. The identical command resumes
there: ``run.resume_sampler(sampler, batch)`` makes the training sampler (a ``dataloaders.seeding.
ResumableSampler``) skip the batches already trained and restore the saved RNG state just before the next batch is
loaded, so the run continues with the same batches and random draws as an uninterrupted one. (Launchers that do
not save mid-epoch, ``mid_epoch_saves=False``, start the interrupted epoch over.)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, TypeVar

import torch

from util import dist as dist_util
from util.amp import AmpConfig, NonFiniteLossError
from util.lr_sched import effective_lr
from util.metrics import JsonlLogger
from harness.checkpoints import CheckpointKeeper, nothing_left, restore_training_state, rng_state, set_rng_state
from harness.devices import build_optimizer
from harness.errors import cleanup_quietly, is_rank0, report_error
from harness.flags import warn_dead_flags
from harness.output import open_log_writer, record_raster_dtype, save_run_config
from harness.run_control import EXIT_PREEMPTED, StopRequest

__all__ = ["stop_preempted", "training_run", "start_optimizer", "evaluate_only", "TrainingRun"]

T = TypeVar("T")


def stop_preempted(stop: StopRequest, what: str) -> None:
    """End a run stopped by SIGTERM/SIGUSR1: one line (rank 0) saying ``what`` was saved, then exit status 75
    (``EXIT_PREEMPTED``, EX_TEMPFAIL) on every rank, which a requeue script tests."""
    if is_rank0():
        sys.stdout.flush()
        signame = stop.signal_name or "a stop signal on another rank"
        dist_util.ORIGINAL_PRINT(f"stopped by {signame}: {what}; rerun the same command to resume "
                                  f"(exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    try:
        dist_util.cleanup()  # every rank agreed on this stop: they all meet before gloo/NCCL is torn down
    except Exception:  # noqa: BLE001 - the checkpoint is saved; exit 75 whatever the teardown says
        pass
    raise SystemExit(EXIT_PREEMPTED)


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
        cleanup_quietly()
        raise SystemExit(1) from None
    finally:
        stop.restore()
        if log_writer is not None:
            log_writer.close()
    if keeper is not None:
        keeper.finish()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start))}")


def start_optimizer(param_groups: list[dict], args: argparse.Namespace, device: torch.device,
                    resumed: Optional[Mapping], resume: Optional[str], keep_names: bool = False
                    ) -> tuple[torch.optim.Optimizer, AmpConfig, Optional[int]]:
    """``--lr`` (default: ``--blr`` scaled by the effective batch), AdamW + AMP (:func:`build_optimizer`) and the
    training state of the resumed checkpoint ``resumed`` (sets ``args.start_epoch``). Returns ``(optimizer, amp,
    step to start at)``; the step is None (and the reason printed) when the resumed run has finished ``--epochs``."""
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.accum_iter, dist_util.get_world_size())
    optimizer, amp = build_optimizer(param_groups, args, device, keep_names=keep_names)
    start_step = restore_training_state(resumed, optimizer, amp, args, source=str(resume))
    return optimizer, amp, (None if nothing_left(args, resume, start_step) else start_step)


def evaluate_only(out_dir: Path, args: argparse.Namespace, cfg: Optional[Mapping], evaluate: Callable[[], T],
                  **config_extra: Any) -> T:
    """The tail of an evaluation run (``--eval`` / ``--eval_only``): ``config_eval.yaml``, ``evaluate()``, the
    process group torn down. Returns the evaluation's result."""
    save_run_config(out_dir, args, cfg, evaluating=True, **config_extra)
    result = evaluate()
    dist_util.cleanup()
    return result


class TrainingRun:
    """One training run in ``out_dir``: created once the run is about to train (it records the pixel dtype of
    ``train_data``, the training dataset, as ``args.raster_dtype``: :func:`record_raster_dtype`; writes
    ``config.yaml`` and its history entry, warns about ``dead_flags`` set by the user, opens TensorBoard on rank 0
    and the :class:`CheckpointKeeper` of ``writer``), then :meth:`train` runs the epoch loop (see the module docstring).

    Attributes the hooks may read: ``log_writer`` (None off rank 0), ``keeper``, ``history`` (one dict per
    finished epoch, as in ``log.txt``), ``start_step`` (the resumed step inside ``args.start_epoch``; 0 after the
    first epoch), ``resume_rng`` (the RNG state of the resumed checkpoint ``resumed`` when it was saved mid-epoch;
    :meth:`resume_sampler` restores it).
    """

    def __init__(self, args: argparse.Namespace, out_dir: Path, writer: str, cfg: Optional[Mapping], *,
                 parser: Optional[argparse.ArgumentParser] = None, dead_flags: Optional[Mapping[str, str]] = None,
                 start_step: int = 0, resumed: Optional[Mapping] = None, train_data: Any = None,
                 **config_extra: Any) -> None:
        if train_data is not None:  # before anything is saved: config.yaml and every checkpoint's args record it
            record_raster_dtype(args, train_data)
        save_run_config(out_dir, args, cfg, **config_extra)
        if dead_flags and parser is not None:
            warn_dead_flags(args, parser, dead_flags)
        self.args, self.out_dir, self.start_step = args, out_dir, start_step
        self.resume_rng = (resumed or {}).get("rng") if start_step else None
        self.log_writer = open_log_writer(args.log_dir) if dist_util.is_main_process() else None
        self.keeper = CheckpointKeeper(out_dir, writer)
        self.log = JsonlLogger(out_dir)
        if resumed and isinstance(resumed.get("epoch"), int):
            for note in self.log.reconcile(resumed["epoch"], resumed.get("log_entry")):
                print(f"log.txt: {note}")
        self.history: list[dict[str, Any]] = []
        self.stop: Optional[StopRequest] = None
        self._state: Optional[Callable[[int], dict]] = None
        self._stopped_at: Optional[str] = None

    def resume_sampler(self, sampler: Any, batch_size: int) -> None:
        """Position the training sampler (a ``dataloaders.seeding.ResumableSampler``: ``set_epoch``, ``skip``,
        ``on_resume``) at the resumed step: epoch ``args.start_epoch``, its first ``start_step`` batches of
        ``batch_size`` skipped, and the RNG state of a mid-epoch checkpoint restored just before the next batch is
        loaded. Call once, before :meth:`train`."""
        sampler.set_epoch(self.args.start_epoch)
        sampler.skip = self.start_step * batch_size
        if self.resume_rng is not None:
            rng = self.resume_rng
            sampler.on_resume = lambda: set_rng_state(rng)

    def step_saver(self, epoch: int, steps_per_epoch: int) -> Callable[[int], None]:
        """The engine's ``on_step_end(step)`` for ``epoch`` (call it after every optimizer step): a resumable save
        of ``state(epoch - 1)`` + ``resume_epoch``/``resume_step``/``rng`` every ``--save_every_steps`` optimizer
        steps (0 or absent: never) and at the step where a stop was agreed (then :meth:`train` exits 75 once the
        engine returns). The last step of the epoch is left to the end-of-epoch save."""
        args, stop, state = self.args, self.stop, self._state
        assert stop is not None and state is not None, "step_saver is called inside TrainingRun.train"
        every_n = int(getattr(args, "save_every_steps", 0) or 0)

        def save(step: int) -> None:
            every = every_n > 0 and (step + 1) % every_n == 0
            if (every or stop.agreed) and step + 1 < steps_per_epoch:
                checkpoint = state(epoch - 1)
                if dist_util.is_main_process():
                    checkpoint.update(resume_epoch=epoch, resume_step=step + 1, rng=rng_state())
                label = f"epoch {epoch} after {step + 1} step(s)"
                self.keeper.save(checkpoint, label)
                if stop.agreed:
                    self._stopped_at = label

        return save

    def train(self, train_epoch: Callable[[int, StopRequest], Mapping[str, float]],
              state: Callable[[int], dict], *, evaluate: Optional[Callable[[int], Mapping[str, Any]]] = None,
              before_epoch: Optional[Callable[[int], None]] = None, context: Optional[ContextManager] = None,
              mid_epoch_saves: bool = False, announce: bool = True) -> list[dict[str, Any]]:
        """The epoch loop from ``args.start_epoch`` to ``args.epochs`` under :func:`training_run`.

        ``train_epoch(epoch, stop)``: one epoch (the engine gets ``stop`` and ``on_finite_loss=run.keeper.verify``),
        returns its averaged stats (logged as ``train_<key>``); ``evaluate(epoch)``: entries added to the epoch's
        log line (called before the save, so that ``state`` can hold the best score); ``state(epoch)``: the
        checkpoint saved at the end of the epoch (and, by :meth:`step_saver`, mid-epoch); ``context``: entered
        inside the loop's context (e.g. a figure thread); ``mid_epoch_saves``: ``train_epoch`` passes
        :meth:`step_saver` to its engine (a stop resumes at its step, else the epoch starts over). Returns the
        history; the process group is torn down at the end."""
        args, keeper = self.args, self.keeper
        if announce:
            print(f"Start training for {args.epochs} epochs (from epoch {args.start_epoch})")
        with training_run(self.log_writer, keeper) as stop, context or contextlib.nullcontext():
            self.stop, self._state = stop, state
            for epoch in range(args.start_epoch, args.epochs + 1):
                if before_epoch is not None:
                    before_epoch(epoch)
                if epoch == args.epochs:
                    break
                stats = train_epoch(epoch, stop)
                if self._stopped_at is not None:  # SIGTERM/SIGUSR1: resumable state saved; stats stay unlogged
                    stop_preempted(stop, f"saved {keeper.latest} at {self._stopped_at}")
                if stop.agreed and not mid_epoch_saves:  # no mid-epoch state: resume redoes this epoch
                    stop_preempted(stop, f"{keeper.holding()}; epoch {epoch} starts over")
                self.start_step = 0
                entry: dict[str, Any] = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
                if evaluate is not None:
                    entry.update(evaluate(epoch))
                checkpoint = state(epoch)
                if dist_util.is_main_process():  # the log line too: a resumed run writes it if the kill came first
                    checkpoint["log_entry"] = entry
                keeper.save(checkpoint, f"the end of epoch {epoch}", epoch=epoch, args=args)
                self.history.append(entry)
                self.log.log(entry)  # rank 0 only
                if self.log_writer is not None:
                    self.log_writer.flush()
                if stop.agreed and epoch + 1 < args.epochs:  # the engine finished the epoch: resume at the next
                    stop_preempted(stop, f"saved {keeper.latest} at the end of epoch {epoch}")
        dist_util.cleanup()
        return self.history
