"""Helpers shared by the benchmarks: timing, memory readings, machine description, model configurations."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

GIB = 1024**3

# Model configurations (keyword arguments of models_mae.MaskedAutoencoderViT).
CONFIGS: Dict[str, dict] = {
    # the SPEC's "tiny config 64->128": 192-d/4-block encoder, 128-d/2-block decoder, 64-d heads
    # (= models_mae.mae_vit_tiny_patch16 at img_size 64)
    "tiny": dict(img_size=64, patch_size=16, embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128,
                 decoder_depth=2, decoder_num_heads=4, fcn_dim=64),
    # tests/conftest.py's TINY_MAE: only for the smoke suite
    "micro": dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2, fcn_dim=16, fcn_layers=1),
    # mae_vit_base_patch16 with the CLI defaults (decoder 512-d x 3 blocks, 16 heads, FCN 512-d x 2 layers)
    "vit_base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                     decoder_depth=3, decoder_num_heads=16),
    # mae_vit_large_patch16 (the released architecture)
    "vit_large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                      decoder_depth=3, decoder_num_heads=16),
}


def apply_allocator(allocator: str) -> bool:
    """``"reuse"``: what the launchers apply on CPU (``util.cpu_memory.keep_freed_memory``; returns whether glibc
    took it); ``"system"``: glibc's defaults, as the original runs (returns False). Call before allocating."""
    if allocator not in ("system", "reuse"):
        raise ValueError(f"allocator must be 'system' or 'reuse', got {allocator!r}")
    from util.cpu_memory import keep_freed_memory

    return keep_freed_memory() if allocator == "reuse" else False


def build_model(config: str, baseline: bool = False, seed: int = 0, device: str = "cpu",
                fast_decoder: str = "auto"):
    """A freshly initialised model of ``CONFIGS[config]`` (``BaselineMAE`` when ``baseline``); ours gets the decoder
    the launchers choose for ``device`` (``--fast_decoder auto``: the channels-last path on CPU)."""
    import torch

    import models_mae
    from util.accel import use_fast_decoder

    torch.manual_seed(seed)
    if baseline:
        from baseline import BaselineMAE

        return BaselineMAE(**CONFIGS[config])
    model = models_mae.MaskedAutoencoderViT(**CONFIGS[config])
    model.set_fast_decoder(use_fast_decoder(fast_decoder, device))
    return model


def summarize(samples: List[float]) -> dict:
    """Median / min / max / all samples (seconds) of repeated timings."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": [round(s, 5) for s in samples]}


def time_calls(fn: Callable[[], object], warmup: int, iters: int) -> List[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _proc_status_kib(key: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process now, bytes (``VmRSS``; falls back to the peak)."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes: ``VmHWM`` on Linux, else ``ru_maxrss``. Not
    ``ru_maxrss`` on Linux: it carries the parent's high-water mark over ``fork``/``exec`` into a child (a child of
    a 400 MiB parent reports >= 400 MiB), so a bench child would report its launcher's memory."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


def cpu_busy(interval: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs busy over the next ``interval`` seconds (from /proc/stat; None where unavailable).

    Called while this process sleeps, it measures what other processes use.
    """
    def sample():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(1, t1 - t0), 3)


def wait_for_idle(max_wait: Optional[float] = None, threshold: float = 0.25) -> Tuple[Optional[float], float]:
    """Wait up to ``max_wait`` s (default: env ``BENCH_WAIT_IDLE``, else no wait) until other processes use less
    than ``threshold`` of the CPUs. Returns (last busy fraction, seconds waited)."""
    if max_wait is None:
        max_wait = float(os.environ.get("BENCH_WAIT_IDLE", "0") or 0)
    if max_wait <= 0:
        return None, 0.0
    t0 = time.time()
    busy = cpu_busy(0.3)
    while busy is not None and busy > threshold and time.time() - t0 < max_wait:
        time.sleep(1.0)
        busy = cpu_busy(0.5)
    return busy, round(time.time() - t0, 2)


def _ticks() -> Optional[Tuple[int, int, int]]:
    """(all CPUs' total ticks, their busy ticks, this process's own user+system ticks) from /proc."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return sum(vals), sum(vals) - vals[3] - vals[4], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between ``start()`` and ``stop()``.

    (all CPUs' busy ticks - this process's ticks) / all CPUs' ticks; tick resolution 10 ms. None without /proc.
    """

    def start(self) -> "OtherLoad":
        self._t0 = _ticks()
        return self

    def stop(self) -> Optional[float]:
        t1 = _ticks()
        if self._t0 is None or t1 is None or t1[0] <= self._t0[0]:
            return None
        total = t1[0] - self._t0[0]
        return round(max(0.0, (t1[1] - self._t0[1]) - (t1[2] - self._t0[2])) / total, 3)


def load_average() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    """CPU, core count, library versions, accelerator name, current load (CPU timings are load-sensitive)."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover
        timm_version = None
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm_version,
        "numpy": numpy.__version__,
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({cpu})",
        "mem_total_gib": _mem_total_gib(),
        "load_average": load_average(),
        "platform": platform.platform(),
    }


def _mem_total_gib():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        return None
    return None
