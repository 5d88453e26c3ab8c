"""Peak memory of a pretraining step (forward + backward + AdamW), to be run in a fresh process per variant.

``run`` must be the first thing the process does: the peak resident set size (``ru_maxrss``) is a process-wide
high-water mark. Reported: the RSS once the model, optimizer and batch exist (``rss_model``), the peak over
``steps`` training steps (``peak_rss``, includes weights, gradients, AdamW state and activations) and
``peak - rss_model`` (``step_rss``: what training adds on top of the built model), of which gradients + AdamW
moments are ``3 x 4 bytes x trainable parameters`` and the rest (``activations_gib``) is the activation memory.
With CUDA available the model runs there and ``torch.cuda.max_memory_allocated`` is reported too.
"""
from __future__ import annotations

import time

import bench_utils  # noqa: F401
from bench_utils import CONFIGS, GIB, apply_allocator, build_model, current_rss, peak_rss


def run(config: str = "vit_base", batch: int = 4, grad_checkpointing: bool = False, steps: int = 2,
        input_size: int = 0, seed: int = 0, allocator: str = "system") -> dict:
    """``allocator``: ``"system"`` (glibc defaults) or ``"reuse"`` (``--cpu_allocator reuse``, the CPU default of the
    launchers: freed memory stays in the heap, so the peak RSS is higher)."""
    import torch

    applied = apply_allocator(allocator)

    from bench_step import make_batch, make_optimizer

    rss_import = current_rss()
    cfg = CONFIGS[config]
    side = input_size or cfg["img_size"]
    grid = side // cfg["patch_size"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(config, seed=seed, device=device.type).to(device)
    model.set_grad_checkpointing(grad_checkpointing)
    model.train()
    opt = make_optimizer(model)
    imgs, targets, input_res, target_res, noise = (t.to(device) for t in make_batch(batch, side, grid, seed + 1))
    rss_model = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(imgs, targets, input_res=input_res, target_res=target_res, noise=noise)[0]
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = peak_rss()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = n_params * 4 * 3  # fp32 gradients + AdamW exp_avg + exp_avg_sq (allocated during the first step)
    out = {"config": config, "batch": batch, "input_size": side, "target_size": 32 * grid,
           "grad_checkpointing": grad_checkpointing, "steps": steps, "allocator": allocator,
           "allocator_applied": applied,
           "rss_after_import_gib": rss_import / GIB, "rss_model_gib": rss_model / GIB, "peak_rss_gib": peak / GIB,
           "step_rss_gib": (peak - rss_model) / GIB, "grads_and_adam_state_gib": state / GIB,
           "activations_gib": (peak - rss_model - state) / GIB, "last_step_s": times[-1], "losses": losses,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "device": device.type}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out
