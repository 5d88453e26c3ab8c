"""Segmentation training step: encoder + pyramid neck + UPerNet (+ auxiliary FCN), forward + backward + AdamW.

Prints one JSON object: the median step time over ``--iters`` steps after ``--warmup``, images/s, peak resident
memory (CPU) or peak allocated memory (CUDA), the machine and its load. Losses as ``main_segment.py`` computes them
(cross-entropy + 0.4 x auxiliary cross-entropy), parameter groups with layer-wise decay and the launchers' optimizer/AMP setup (``harness.build_optimizer``).

    python bench/bench_segment.py --model vit_large_patch16 --input_size 224 --batch_size 2 --device cpu
    python bench/bench_segment.py --model vit_large_patch16 --input_size 512 --batch_size 8 --device cuda --amp bf16
"""
from __future__ import annotations

import argparse
import json
from argparse import Namespace

import bench_utils  # noqa: F401  (puts the repo on sys.path)
from bench_utils import machine_info, peak_rss, summarize, time_calls


def run(model: str = "vit_tiny_patch16", input_size: int = 224, batch_size: int = 2, warmup: int = 2,
        iters: int = 5, device: str = "cpu", amp: str = "none", channels: int = 512, aux_channels: int = 256,
        grad_checkpointing: bool = False, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    import main_segment
    import models_seg
    import harness

    torch.manual_seed(seed)
    dev = torch.device(device)
    net = models_seg.build_segmentation_model(model, 2, img_size=input_size, channels=channels,
                                              aux_channels=aux_channels).to(dev)
    if grad_checkpointing:
        net.backbone.set_grad_checkpointing(True)
    args = Namespace(weight_decay=0.05, layer_decay=0.65, lr=1e-4, amp=amp)
    opt, ampc = harness.build_optimizer(main_segment.build_param_groups(net, args), args, dev)  # as launched
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=g).to(dev)
    y = (torch.rand(batch_size, input_size, input_size, generator=g) > 0.7).long().to(dev)
    res = torch.full((batch_size,), 1.0, device=dev)
    params = [p for p in net.parameters() if p.requires_grad]

    def step():
        with ampc.autocast():
            logits, aux = net(x, input_res=res, return_aux=True)
        loss = F.cross_entropy(logits.float(), y, ignore_index=255)
        if aux is not None:
            loss = loss + 0.4 * F.cross_entropy(aux.float(), y, ignore_index=255)
        ampc.backward_step(loss, opt, params)
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = summarize(time_calls(step, warmup, iters))
    out = {
        "bench": "segment_step", "model": model, "input_size": input_size, "batch_size": batch_size,
        "device": device, "amp": ampc.mode, "head_channels": channels, "aux_channels": aux_channels,
        "grad_checkpointing": grad_checkpointing,
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "step_s": stats, "img_per_s": round(batch_size / stats["median"], 3),
        "peak_rss_gib": round(peak_rss() / 2**30, 2),
        "machine": machine_info(),
    }
    if dev.type == "cuda":
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser("segmentation step benchmark")
    p.add_argument("--model", default="vit_tiny_patch16")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=2, type=int)
    p.add_argument("--warmup", default=2, type=int)
    p.add_argument("--iters", default=5, type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16", "auto"])
    p.add_argument("--head_channels", default=512, type=int)
    p.add_argument("--aux_channels", default=256, type=int)
    p.add_argument("--grad_checkpointing", action="store_true")
    a = p.parse_args()
    print(json.dumps(run(a.model, a.input_size, a.batch_size, a.warmup, a.iters, a.device, a.amp, a.head_channels,
                         a.aux_channels, a.grad_checkpointing), indent=1))


if __name__ == "__main__":
    main()
