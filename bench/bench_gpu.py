"""Pretraining step on an accelerator: img/s, model TFLOP/s, MFU, peak memory; ours eager / compiled against the
straightforward baseline (``bench/baseline.py``), at one batch and precision.

One step = forward (ours: ``loss_only``, as engine_pretrain calls it; the baseline: the original's full 8-tuple),
backward and AdamW (ours: fused, as the launchers build it; the baseline: torch's default AdamW, as the original),
under autocast of ``precision`` (fp16 with a GradScaler for both). Times are medians of per-step times after warm-up,
each step ended by a device synchronisation.

FLOPs: one count for every implementation -- torch's ``FlopCounterMode`` over one forward + backward of the
*baseline* (the original's formulation) at batch 1, times the batch. TFLOP/s = that count / step time; MFU is
against the datasheet dense peak of the precision (``DATASHEET_TFLOPS``, None for an unknown device) and against a
square GEMM measured in the same process (``gemm_tflops``).

``quick=True`` (``run.py --suite gpu --quick``, what tests/test_bench.py runs on CPU): the tiny ``micro`` config at
batch 2, two timed steps, and compile with the ``aot_eager`` backend (dynamo + AOTAutograd without inductor's code
generation, which takes minutes on 2 cores) -- it checks the plumbing, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Optional, Sequence

import bench_utils  # noqa: F401  (puts the repo on sys.path)
from bench_utils import CONFIGS, GIB, build_model, peak_rss

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, by a substring of torch.cuda.get_device_name().
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}

VARIANTS = ("baseline", "eager", "compile")


def datasheet_peak(device_name: str, precision: str) -> Optional[float]:
    for key, peaks in DATASHEET_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(device, precision: str, n: int, iters: int = 10) -> float:
    """Measured TFLOP/s of an n x n x n matmul in ``precision`` (the practical peak of the device)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def count_flops(config: str, side: int, device) -> int:
    """FLOPs of one forward + backward of the baseline (the original's formulation) on one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from baseline import baseline_from
    from bench_step import make_batch

    cfg = CONFIGS[config]
    ours = build_model(config, device=device.type)
    model = baseline_from(ours, **cfg).to(device).train()
    grid = side // cfg["patch_size"]
    imgs, targets, input_res, target_res, noise = (t.to(device) for t in make_batch(1, side, grid, 0))
    counter = FlopCounterMode(display=False)
    with counter:
        model(imgs, targets, input_res=input_res, target_res=target_res, noise=noise)[0].backward()
    total = counter.get_total_flops()
    del model, ours
    return int(total)


def run(config: str = "vit_large", batch: int = 32, precision: str = "bf16", variants: Sequence[str] = VARIANTS,
        warmup: int = 3, iters: int = 10, compile_mode: str = "default", input_size: int = 0, device: str = "auto",
        quick: bool = False, seed: int = 0, gemm_n: int = 8192) -> dict:
    import torch

    from baseline import baseline_from
    from bench_step import make_batch, make_optimizer
    from util.accel import CompiledWithFallback, apply_model_options
    from util.amp import AmpConfig
    from harness import build_optimizer
    from util.lr_decay import param_groups_weight_decay

    backend = None
    if quick:
        config, batch, warmup, iters, gemm_n, backend = "micro", 2, 1, 2, 256, "aot_eager"
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    cfg = CONFIGS[config]
    side = input_size or cfg["img_size"]
    grid = side // cfg["patch_size"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = datasheet_peak(name, precision)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "fp32"  # fp32 steps use TF32 GEMMs, as trainers do
        torch.backends.cudnn.allow_tf32 = precision == "fp32"
    gemm = gemm_tflops(dev, precision if dev.type == "cuda" or precision != "fp16" else "fp32", gemm_n)
    flops_per_image = count_flops(config, side, dev)
    data = [tuple(t.to(dev) for t in make_batch(batch, side, grid, seed + 100 + i)) for i in range(2)]

    out = {"config": config, "input_size": side, "target_size": 32 * grid, "batch": batch, "precision": precision,
           "device": name, "device_type": dev.type, "quick": quick, "warmup": warmup, "iters": iters,
           "compile_mode": compile_mode, "compile_backend": backend or "inductor",
           "flops_per_image": flops_per_image, "flops_per_step": flops_per_image * batch,
           "flop_count": "torch FlopCounterMode, baseline (original formulation) fwd + bwd at batch 1, x batch",
           "datasheet_tflops": peak, "gemm_tflops": gemm, "variants": {}}

    for variant in variants:
        ckpt = variant.split("ckpt_")[1] if "ckpt_" in variant else None
        compiled = variant.startswith("compile")
        ours = build_model(config, seed=seed, device=dev.type).to(dev).train()
        if variant == "baseline":
            model = baseline_from(ours, **cfg).to(dev).train()
            del ours
            opt = make_optimizer(model)
        else:
            model = ours
            apply_model_options(model, argparse.Namespace(fast_decoder="auto", grad_checkpointing=ckpt), dev)
            # as the launchers build it: fused AdamW, wd 0.05 on >= 2-D tensors
            opt, _ = build_optimizer(param_groups_weight_decay(model, 0.05),
                                     argparse.Namespace(lr=1.5e-4, amp="none"), dev)
        amp = AmpConfig(precision if precision != "fp32" else "none", dev)
        call = model
        if compiled:
            kwargs = {"backend": backend} if backend else {}
            call = CompiledWithFallback(model, mode=compile_mode, **kwargs)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(i: int) -> float:
            im, tg, ir, tr, nz = data[i % len(data)]
            t0 = time.perf_counter()
            with amp.autocast():
                if variant == "baseline":
                    loss = call(im, tg, input_res=ir, target_res=tr, noise=nz)[0]
                else:
                    loss = call(im, tg, input_res=ir, target_res=tr, noise=nz, loss_only=True)
            amp.backward_step(loss, opt, params)
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            return time.perf_counter() - t0

        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        first = step(0)  # includes compilation for compiled variants
        for i in range(1, warmup):
            step(i)
        times = [step(i) for i in range(iters)]
        s = statistics.median(times)
        tflops = flops_per_image * batch / s / 1e12
        entry = {"s_per_step": s, "images_per_s": batch / s, "first_step_s": first, "tflops": tflops,
                 "mfu_datasheet": tflops / peak if peak else None, "mfu_measured_gemm": tflops / gemm,
                 "grad_checkpointing": ckpt,
                 "fast_decoder": bool(getattr(model, "fast_decoder", False)) if variant != "baseline" else None}
        if dev.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
        else:
            entry["peak_rss_gib_process"] = peak_rss() / GIB  # process-wide high-water mark (monotone)
        if compiled:
            entry["compile_failed"] = call.failed
        out["variants"][variant] = entry
        del model, call, opt, params
        gc.collect()

    v = out["variants"]
    base = v.get("baseline", {}).get("images_per_s")
    for name_, entry in v.items():
        if base and name_ != "baseline":
            out[f"speedup_{name_}_vs_baseline"] = entry["images_per_s"] / base
    if "compile" in v and "eager" in v:
        out["speedup_compile_vs_eager"] = v["compile"]["images_per_s"] / v["eager"]["images_per_s"]
    return out
