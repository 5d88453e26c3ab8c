"""kNN feature-extraction throughput: ``util.knn_eval.extract_features`` at several evaluation sides, fp32 / bf16.

Images of 224 px (already normalised) are area-resized to each side inside ``extract_features`` and encoded with
``model(x, input_res=res, knn_feats=True)`` (cls token of the unmasked encoder), as the kNN monitor does.
Per side and precision: one warm-up batch, then the median of the ``iters`` batches during which other
processes used < 10 % of the CPUs (the fastest batch when none was clean). ``batch`` is one size or a
``{side: size}`` map: small sides need large batches to be efficient (the original's kNN used 64 with
``--eval_only``). ``baseline_fp32`` runs the same images through ``bench/baseline.py`` (host float64 tables,
unfused attention) for comparison. ``allocator="reuse"`` applies what the launchers apply on CPU
(``--cpu_allocator reuse``) before anything is allocated; run.py measures that in a process of its own
(``features_launch``).
"""
from __future__ import annotations

import statistics
import time

import bench_utils  # noqa: F401
from bench_utils import OtherLoad, apply_allocator, build_model, summarize, wait_for_idle


def run(config: str = "vit_large", sides=(56, 112, 224), batch=8, iters: int = 3,
        precisions=("fp32", "bf16"), baseline: bool = False, seed: int = 0, allocator: str = "system") -> dict:
    import torch

    from util.knn_eval import extract_features

    applied = apply_allocator(allocator)

    device = torch.device("cpu")
    model = build_model(config, seed=seed).eval()
    models = {"ours": model}
    if baseline:
        from baseline import baseline_from
        from bench_utils import CONFIGS

        models["baseline"] = baseline_from(model, **CONFIGS[config]).eval()
    g = torch.Generator().manual_seed(seed)
    batches = {int(k): int(v) for k, v in batch.items()} if isinstance(batch, dict) else {s: int(batch) for s in sides}
    all_imgs = torch.randn(max(batches.values()), 3, 224, 224, generator=g)
    out = {"config": config, "batch": {str(s): batches[s] for s in sides}, "iters": iters, "allocator": allocator,
           "allocator_applied": applied, "results": {}}
    runs = [("ours", p) for p in precisions] + ([("baseline", "fp32")] if baseline else [])
    for side in sides:
        imgs = all_imgs[:batches[side]]
        labels = torch.zeros(imgs.shape[0], dtype=torch.long)
        for who, prec in runs:
            amp = torch.bfloat16 if prec == "bf16" else None
            times, other = [], []
            for i in range(iters + 1):
                if i:
                    wait_for_idle()
                meter = OtherLoad().start()
                t0 = time.perf_counter()
                feats, _ = extract_features(models[who], [(imgs, labels)], side, 1.0, device, amp)
                if i:
                    times.append(time.perf_counter() - t0)
                    other.append(meter.stop())
            s = summarize(times)
            clean = [t for t, o in zip(times, other) if o is not None and o < 0.10]
            sec = statistics.median(clean) if clean else min(times)
            out["results"][f"{who}_{prec}@{side}"] = {"side": side, "who": who, "precision": prec,
                                                      "images_per_s": imgs.shape[0] / sec, "clean_runs": len(clean),
                                                      "timing": s,
                                                      "other_load": other, "feature_dim": int(feats.shape[1])}
    return out
