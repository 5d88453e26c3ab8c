"""Pretraining loader throughput feeding an accelerator: the CPU pipeline (decode + augment in the workers) against
the device pipeline (``--gpu_pipeline``: workers read bytes and draw crops, decode + augment on the device), on
synthetic FMoW-like JPEGs (``bench_data.make_jpegs``, half 600 px, half 1200 px), as ``main_pretrain`` builds them.

Images/s are counted from the second batch on (worker start-up excluded), each batch ended by a device
synchronisation. Compare with the model's img/s of ``bench_gpu.py``: the slower of the two bounds end-to-end
training. ``quick=True``: 8 small files, batch 4, CPU-safe.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import bench_utils  # noqa: F401


def _rate(loader, device, batch: int, batches: int) -> float:
    import torch

    it = iter(loader)
    next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            out = next(it)
        except StopIteration:
            break
        n += out[0].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def run(files: int = 256, batch: int = 64, workers: int = 8, input_size: int = 224, batches: int = 12,
        device: str = "auto", quick: bool = False) -> dict:
    import torch

    from bench_data import make_jpegs
    from dataloaders.gpu_pipeline import build_gpu_pipeline_loader
    from main_pretrain import build_train_loader

    sizes = (600, 1200)
    if quick:
        files, batch, workers, input_size, batches, sizes = 8, 4, 1, 32, 1, (96, 160)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_data_"))
    try:
        make_jpegs(tmp, files, sizes=sizes)
        cfg = {"data": {"type": "fmow", "img_dir": str(tmp), "mean": [0.485, 0.456, 0.406],
                        "std": [0.229, 0.224, 0.225]}}
        args = argparse.Namespace(input_size=input_size, target_size=[2 * input_size], scale_min=0.2, scale_max=1.0,
                                  base_resolution=2.5, world_size=1, rank=0, seed=0, batch_size=batch,
                                  num_workers=workers, pin_mem=True)
        out = {"files": files, "sizes": list(sizes), "batch": batch, "workers": workers, "input_size": input_size,
               "device": dev.type, "quick": quick, "pipelines": {}}
        cpu_loader, _, _ = build_train_loader(args, cfg, dev)
        out["pipelines"]["cpu"] = {"images_per_s": _rate(cpu_loader, dev, batch, batches)}
        dev_loader, _, _ = build_gpu_pipeline_loader(args, cfg, dev)
        out["pipelines"]["device"] = {"images_per_s": _rate(dev_loader, dev, batch, batches)}
        out["ratio_device_vs_cpu"] = (out["pipelines"]["device"]["images_per_s"]
                                      / out["pipelines"]["cpu"]["images_per_s"])
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
