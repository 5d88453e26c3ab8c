"""Training-log helpers: smoothed meters, a console progress logger, and a JSON-lines epoch log."""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from util import dist as dist_util
from util.io import atomic_write, atomic_write_text

__all__ = ["SmoothedValue", "MetricLogger", "JsonlLogger", "save_report", "end_of_update"]


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric value must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


class SmoothedValue:
    """Track a series of values: windowed median/average plus a global (all-time) average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Add ``value`` (weighted ``n`` times in the global average)."""
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over all ranks (the window stays local)."""
        if not dist_util.is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=dist_util.comm_device())
        dist_util.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else math.nan

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """A named collection of ``SmoothedValue`` meters with a progress-printing iterator."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Any) -> None:
        """Record scalar values (Python numbers or one-element tensors); ``None`` values are skipped."""
        for name, value in kwargs.items():
            if value is None:
                continue
            self.meters[name].update(_to_float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters")
        if meters is not None and attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__} has no meter or attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def global_averages(self) -> dict[str, float]:
        """``{name: global_avg}`` for every meter (what goes into the per-epoch log)."""
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable: Iterable[Any], print_freq: int, header: str | None = None,
                  batch_size: int | None = None) -> Iterator[Any]:
        """Yield from ``iterable``, printing progress every ``print_freq`` iterations and at the last one.

        A progress line shows the header, ``[i/total]``, ETA, the meters, iteration time and data-loading time
        (windowed average), throughput in images/s when ``batch_size`` (per iteration, this process) is given,
        and the peak CUDA memory when CUDA is available. A summary line with the total time follows the loop.
        """
        header = header or ""
        print_freq = max(1, int(print_freq))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        try:
            total: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        width = len(str(total)) if total is not None else 0
        start = end = time.time()
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or (total is not None and i == total - 1):
                parts = [header, f"[{i:>{width}}/{total}]" if total is not None else f"[{i}]"]
                if total is not None:
                    eta = iter_time.global_avg * (total - i - 1)
                    parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
                parts += [str(self), f"time: {iter_time}", f"data: {data_time}"]
                if batch_size and iter_time.avg > 0:
                    parts.append(f"img/s: {batch_size / iter_time.avg:.1f}")
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        elapsed = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(elapsed))} "
              f"({elapsed / max(i, 1):.4f} s / it)", flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy scalar
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class JsonlLogger:
    """Append one JSON object per line to ``output_dir/filename`` (rank 0 only; other ranks do nothing)."""

    def __init__(self, output_dir: str | os.PathLike | None, filename: str = "log.txt") -> None:
        self.path: Path | None = Path(output_dir) / filename if output_dir else None

    def log(self, stats: Mapping[str, Any]) -> None:
        """Write ``stats`` as one line; tensors/numpy scalars become numbers, other objects strings."""
        if self.path is None or not dist_util.is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(dict(stats), default=_json_default)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reconcile(self, epoch: int, entry: Optional[Mapping[str, Any]]) -> list[str]:
        """Make the log agree with a resumed checkpoint of finished ``epoch`` (rank 0; returns what was mended).

        A run killed while appending leaves a partial last line: it is dropped. Lines of epochs after ``epoch``
        (their checkpoint was never kept) are dropped: the resumed run logs them again. A run killed between its
        save and its log line lacks the line of ``epoch``: ``entry`` (the line the checkpoint carries) is appended.
        The file is rewritten atomically, and only when something changed."""
        if self.path is None or not dist_util.is_main_process():
            return []
        lines = (self.path.read_text(encoding="utf-8") if self.path.is_file() else "").split("\n")
        mended: list[str] = []
        if lines[-1]:  # no newline at the end: the last append was cut short
            mended.append("dropped a partial last line")
        kept, seen = [], set()
        for line in lines[:-1]:
            try:
                line_epoch = json.loads(line).get("epoch")
            except (ValueError, AttributeError):
                mended.append("dropped an unreadable line")
                continue
            if isinstance(line_epoch, int) and line_epoch > epoch:
                mended.append(f"dropped the line of epoch {line_epoch} (after the resumed epoch {epoch})")
                continue
            seen.add(line_epoch)
            kept.append(line)
        if entry is not None and epoch >= 0 and epoch not in seen:
            kept.append(json.dumps(dict(entry), default=_json_default))
            mended.append(f"added the missing line of epoch {epoch}")
        if mended:
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return mended


def save_report(result: Mapping[str, Any], output_dir: str | os.PathLike, tag: str,
                table_fn: Callable[[Mapping[str, Any]], str], plot_fn: Callable[[Mapping[str, Any], Any], None]
                ) -> dict[str, Path]:
    """Write an evaluation result three ways: ``{tag}.json`` (the result), ``{tag}.md`` (``table_fn(result)``) and
    ``{tag}.png`` (``plot_fn(result, ax)`` draws on a 5 x 3.5 in matplotlib axis; Agg backend). Returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{tag}.json", "md": out / f"{tag}.md", "png": out / f"{tag}.png"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2, default=str))
    atomic_write_text(paths["md"], table_fn(result) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    plot_fn(result, ax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(paths["png"], lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return paths


def end_of_update(log_writer: Any, epoch: int, step: int, num_steps: int, scalars: Mapping[str, float],
                  on_step_end: Optional[Callable[[int], None]] = None, stop: Any = None) -> bool:
    """What a training engine does after each optimizer step: the ``train/<name>`` TensorBoard scalars at
    ``x = 1000 * (epoch + step / num_steps)``, the launcher's step hook (mid-epoch saves), and the stop verdict.

    Returns True when an agreed stop request (``stop.agreed``, SIGTERM/SIGUSR1 on any rank) ends the epoch here.
    """
    if log_writer is not None:
        x = int((step / num_steps + epoch) * 1000)
        for name, value in scalars.items():
            log_writer.add_scalar(f"train/{name}", value, x)
    if on_step_end is not None:
        on_step_end(step)
    return bool(stop is not None and stop.agreed)
