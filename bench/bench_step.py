"""Pretraining step time: forward + backward + AdamW step, ours (fp32, bf16 autocast) vs the baseline (fp32).

Optional variant ``ours_fp32_ckpt``: ours with ``set_grad_checkpointing(True)`` (the time cost of checkpointing).

The variants are interleaved step by step (ours fp32, baseline fp32, ours bf16, ours fp32, ...) so that a change
of machine load hits all of them alike; each reports the median of ``iters`` timed steps after ``warmup`` steps.
The share of CPU time other processes used during each round is recorded; when at least half of the rounds are
clean (< 10 %), the medians are over the clean rounds only (``median_over``), the all-round figures are kept too.
Before timing, ours and the baseline (same weights) run one forward on the same batch and masking noise and the
relative loss difference is recorded (``loss_check``): the comparison is at equal maths.

``allocator``: ``"system"`` (glibc's defaults, what the original runs with) or ``"reuse"`` (what
``main_pretrain.py --device cpu`` sets up, ``util.cpu_memory.keep_freed_memory``). The setting is process-wide, so
run.py measures ours as launched in a process of its own (``*_launch`` jobs) and compares it with the baseline of
the ``system`` process.
"""
from __future__ import annotations

import time

import bench_utils  # noqa: F401  (puts the repo on sys.path)
from bench_utils import CONFIGS, OtherLoad, apply_allocator, build_model, summarize, wait_for_idle

CLEAN = 0.10  # a round is "clean" when other processes used less than this share of the CPUs during it

VARIANTS = ("ours_fp32", "baseline_fp32", "ours_bf16")


def make_optimizer(model, fused: bool = False):
    """AdamW as main_pretrain builds it: two groups (wd 0.05 on >= 2-D tensors), betas (0.9, 0.95)."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1.5e-4, betas=(0.9, 0.95), fused=fused or None)


def make_batch(batch: int, side: int, grid: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, side, side, generator=g)
    targets = torch.randn(batch, 3, 32 * grid, 32 * grid, generator=g)
    target_res = 1.1 + 1.4 * torch.rand(batch, generator=g)  # the range the FMoW pipeline produces
    input_res = target_res * 2
    noise = torch.rand(batch, grid * grid, generator=g)
    return imgs, targets, input_res, target_res, noise


def run(config: str = "tiny", batch: int = 8, warmup: int = 3, iters: int = 10, variants=VARIANTS,
        input_size: int = 0, fused_adamw_ours: bool = False, seed: int = 0, allocator: str = "system") -> dict:
    import torch

    allocator_applied = apply_allocator(allocator)

    from baseline import baseline_from

    cfg = CONFIGS[config]
    side = input_size or cfg["img_size"]
    grid = side // cfg["patch_size"]
    ours = build_model(config, seed=seed)
    base = baseline_from(ours, **cfg) if any(v.startswith("baseline") for v in variants) else None
    ours.train()
    if base is not None:
        base.train()

    # ---- equal maths: same weights, batch and masking noise
    imgs, targets, input_res, target_res, noise = make_batch(batch, side, grid, seed + 1)
    with torch.no_grad():
        loss_ours = float(ours(imgs, targets, input_res=input_res, target_res=target_res, noise=noise)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_bf16 = float(ours(imgs, targets, input_res=input_res, target_res=target_res, noise=noise)[0])
        loss_base = float(base(imgs, targets, input_res=input_res, target_res=target_res, noise=noise)[0]) \
            if base is not None else None
    loss_check = {"loss_ours_fp32": loss_ours, "loss_ours_bf16": loss_bf16, "loss_baseline_fp32": loss_base,
                  "rel_diff": (abs(loss_ours - loss_base) / abs(loss_base)) if base is not None else None,
                  "rel_diff_bf16": abs(loss_bf16 - loss_ours) / abs(loss_ours), "tolerance": 1e-5}
    loss_check["equal"] = loss_check["rel_diff"] is not None and loss_check["rel_diff"] <= 1e-5

    models = {"ours_fp32": ours, "ours_bf16": ours, "ours_fp32_ckpt": ours, "baseline_fp32": base}
    opts = {"ours": make_optimizer(ours, fused=fused_adamw_ours)}  # the baseline keeps torch's default AdamW, as the original
    if base is not None:
        opts["baseline"] = make_optimizer(base)

    def step(variant: str, i: int, data) -> dict:
        model = models[variant]
        opt = opts[variant.split("_")[0]]
        im, tg, ir, tr, nz = data
        bf16 = variant.endswith("bf16")
        ckpt = variant.endswith("ckpt")
        if ckpt:
            model.set_grad_checkpointing(True)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if variant.startswith("ours"):  # as engine_pretrain calls it: the loss, no visualisation outputs
                loss = model(im, tg, input_res=ir, target_res=tr, noise=nz, loss_only=True)
            else:  # the original's forward returns (and computes) the 8-tuple every step
                loss = model(im, tg, input_res=ir, target_res=tr, noise=nz)[0]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if ckpt:
            model.set_grad_checkpointing(False)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{variant}: non-finite loss at step {i}")
        return {"total": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}

    times = {v: [] for v in variants}
    other, waited = [], 0.0
    for i in range(warmup + iters):
        data = make_batch(batch, side, grid, seed + 100 + i)
        if i >= warmup:
            waited += wait_for_idle()[1]  # only with BENCH_WAIT_IDLE (run.py --wait-idle)
        meter = OtherLoad().start()
        for v in variants:
            t = step(v, i, data)
            if i >= warmup:
                times[v].append(t)
        if i >= warmup:
            other.append(meter.stop())
    clean = [o is not None and o < CLEAN for o in other]
    use_clean = sum(clean) * 2 >= len(clean) and sum(clean) > 0

    out = {"config": config, "model_kwargs": cfg, "input_size": side, "target_size": 32 * grid, "batch": batch,
           "warmup": warmup, "iters": iters, "mask_ratio": 0.75, "optimizer": "AdamW(lr 1.5e-4, wd 0.05, 2 groups)",
           "ours_adamw": "fused" if fused_adamw_ours else "torch default (single-tensor loop on CPU)",
           "baseline_adamw": "torch default (single-tensor loop on CPU)",
           "allocator": allocator, "allocator_applied": allocator_applied,
           "loss_check": loss_check, "other_load_per_round": other, "clean_rounds": sum(clean),
           "median_over": "clean rounds" if use_clean else "all rounds", "waited_for_idle_s": waited,
           "variants": {}}
    for v in variants:
        kept = [t for t, c in zip(times[v], clean) if c or not use_clean]
        total = summarize([t["total"] for t in kept])
        parts = {k: round(summarize([t[k] for t in kept])["median"], 5) for k in ("forward", "backward",
                                                                                 "optimizer")}
        out["variants"][v] = {"s_per_step": total["median"], "images_per_s": batch / total["median"],
                              "s_per_step_min": total["min"], "breakdown_median_s": parts, "timing": total,
                              "all_rounds": summarize([t["total"] for t in times[v]])}
    if "baseline_fp32" in out["variants"]:
        b = out["variants"]["baseline_fp32"]["s_per_step"]
        out["ratio_ours_fp32_vs_baseline"] = out["variants"]["ours_fp32"]["s_per_step"] / b
        out["ratio_ours_fp32_vs_baseline_min"] = (out["variants"]["ours_fp32"]["s_per_step_min"]
                                                  / out["variants"]["baseline_fp32"]["s_per_step_min"])
        if "ours_bf16" in out["variants"]:
            out["ratio_ours_bf16_vs_baseline"] = out["variants"]["ours_bf16"]["s_per_step"] / b
    if "ours_bf16" in out["variants"]:
        out["ratio_bf16_vs_fp32"] = out["variants"]["ours_bf16"]["s_per_step"] / out["variants"]["ours_fp32"][
            "s_per_step"]
    return out
