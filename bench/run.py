#!/usr/bin/env python
"""Benchmark suite entry point: step time, memory, data pipeline, kNN and kNN-feature throughput.

    python bench/run.py --suite smoke|quick|full [--out bench/results] [--only step_tiny,knn]
    python bench/run.py --suite gpu [--quick]     (pretraining step on the accelerator; --quick: tiny, CPU-safe)

Each benchmark runs in its own fresh Python process (memory readings are per-process high-water marks); the
results are written to ``<out>/<suite>-<timestamp>.json`` and ``.md`` and the JSON is printed. See bench/README.md
for what each number means. ``smoke`` (tiny sizes, run by tests/test_bench.py) runs its processes concurrently
and its timings mean nothing; ``quick`` and ``full`` run one process at a time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from bench_utils import cpu_busy, wait_for_idle  # noqa: E402  (no heavy imports there)
MARK = "@@BENCH_RESULT@@"

# The original's measurements on these 2-core machines (SPEC.md section 8), shown next to ours.
ORIGINAL = {
    "vit_base_fp32_b2_s": [4.7, 5.6], "vit_base_fp32_b4_s": [9.4, 9.6], "vit_base_bf16_b2_s": [2.3, 2.5],
    "tiny_b8_s": [0.088, 0.11], "peak_rss_gib_b2": 3.2, "peak_rss_gib_b4": 4.1,
    "data_images_per_s": [92, 100], "decode_pil_images_per_s": {"600": 330, "1200": [85, 100]},
    "knn_100k_10k_s": [21, 25], "knn_100k_10k_extra_gib": 0.5,
    "vit_large_features_fp32_images_per_s": {"56": 20.9, "112": 5.4, "224": 1.35},
}

# (job name, module, kwargs, process group); jobs of one group share a process (only the smoke suite groups).
SUITES = {
    "smoke": [
        ("machine", "bench_utils:machine_info", {}, "a"),
        ("step_tiny", "bench_step", dict(config="micro", batch=2, warmup=1, iters=2), "a"),
        ("step_tiny_launch", "bench_step", dict(config="micro", batch=2, warmup=1, iters=2, allocator="reuse",
                                                variants=["ours_fp32", "ours_bf16"]), "d"),
        ("data", "bench_data", dict(files=4, n_images=12, batch=4, workers=2, input_size=32, sizes=[48, 96],
                                    repeats=1), "a"),
        ("knn", "bench_knn", dict(method="ours", bank=2000, queries=200, dim=64, k=20), "a"),
        ("features", "bench_features", dict(config="micro", sides=[32, 64], batch=2, iters=1), "a"),
        ("memory_plain", "bench_memory", dict(config="micro", batch=2, steps=1), "b"),
        ("memory_grad_ckpt", "bench_memory", dict(config="micro", batch=2, steps=1, grad_checkpointing=True), "c"),
    ],
    "quick": [
        ("machine", "bench_utils:machine_info", {}, None),
        ("step_tiny", "bench_step", dict(config="tiny", batch=8, warmup=3, iters=10, fused_adamw_ours=True), None),
        ("step_tiny_launch", "bench_step", dict(config="tiny", batch=8, warmup=3, iters=10, fused_adamw_ours=True,
                                                allocator="reuse", variants=["ours_fp32", "ours_bf16"]), None),
        ("step_vit_base", "bench_step", dict(config="vit_base", batch=1, warmup=1, iters=3, fused_adamw_ours=True),
         None),
        ("step_vit_base_launch", "bench_step", dict(config="vit_base", batch=1, warmup=1, iters=3,
                                                    fused_adamw_ours=True, allocator="reuse",
                                                    variants=["ours_fp32", "ours_bf16"]), None),
        ("memory_plain", "bench_memory", dict(config="vit_base", batch=4, input_size=112, steps=2), None),
        ("memory_grad_ckpt", "bench_memory", dict(config="vit_base", batch=4, input_size=112, steps=2,
                                                   grad_checkpointing=True), None),
        ("data", "bench_data", dict(files=24, n_images=128, batch=32, workers=2, input_size=224, repeats=2), None),
        ("knn", "bench_knn", dict(method="ours", bank=20000, queries=2000), None),
        ("features", "bench_features", dict(config="vit_base", sides=[56, 112, 224],
                                            batch={"56": 32, "112": 16, "224": 4}, iters=2), None),
    ],
    "full": [
        ("machine", "bench_utils:machine_info", {}, None),
        ("step_tiny", "bench_step", dict(config="tiny", batch=8, warmup=5, iters=20, fused_adamw_ours=True), None),
        ("step_tiny_launch", "bench_step", dict(config="tiny", batch=8, warmup=5, iters=20, fused_adamw_ours=True,
                                                allocator="reuse", variants=["ours_fp32", "ours_bf16"]), None),
        ("step_vit_base", "bench_step", dict(config="vit_base", batch=2, warmup=2, iters=5, fused_adamw_ours=True,
                                             variants=["ours_fp32", "baseline_fp32", "ours_bf16"]), None),
        ("step_vit_base_launch", "bench_step", dict(config="vit_base", batch=2, warmup=2, iters=5,
                                                    fused_adamw_ours=True, allocator="reuse",
                                                    variants=["ours_fp32", "ours_bf16", "ours_fp32_ckpt"]), None),
        ("memory_plain", "bench_memory", dict(config="vit_base", batch=4, steps=2), None),
        ("memory_grad_ckpt", "bench_memory", dict(config="vit_base", batch=4, steps=2, grad_checkpointing=True),
         None),
        ("memory_plain_reuse", "bench_memory", dict(config="vit_base", batch=4, steps=2, allocator="reuse"), None),
        ("memory_grad_ckpt_reuse", "bench_memory", dict(config="vit_base", batch=4, steps=2,
                                                         grad_checkpointing=True, allocator="reuse"), None),
        ("data", "bench_data", dict(files=64, n_images=288, batch=32, workers=2, input_size=224, repeats=3), None),
        ("knn", "bench_knn", dict(method="ours", bank=100000, queries=10000, repeats=2), None),
        ("knn_naive", "bench_knn", dict(method="naive", bank=100000, queries=10000, compare_fp32=True), None),
        ("knn_bf16_probe", "bench_knn", dict(method="bf16_probe", bank=100000, queries=10000, compare_fp32=True),
         None),
        ("features", "bench_features", dict(config="vit_large", sides=[56, 112, 224],
                                            batch={"56": 64, "112": 32, "224": 8}, iters=3, baseline=True), None),
        ("features_launch", "bench_features", dict(config="vit_large", sides=[56, 112, 224],
                                                   batch={"56": 64, "112": 32, "224": 8}, iters=3,
                                                   precisions=["fp32"], allocator="reuse"), None),
    ],
    # On the accelerator (bench_gpu.py): ViT-B and ViT-L 224 -> 448 at batch 32 and 64, bf16, ours eager and
    # compiled against the baseline; fp16 + GradScaler at batch 32; gradient-checkpointing scopes at batch 32.
    "gpu": [("machine", "bench_utils:machine_info", {}, None)] + [
        (f"gpu_{cfg}_b{b}_bf16", "bench_gpu", dict(config=cfg, batch=b, precision="bf16"), None)
        for cfg in ("vit_base", "vit_large") for b in (32, 64)
    ] + [
        ("gpu_vit_large_b32_fp16", "bench_gpu", dict(config="vit_large", batch=32, precision="fp16",
                                                     variants=["baseline", "eager"]), None),
        ("gpu_vit_large_b32_bf16_ckpt", "bench_gpu", dict(config="vit_large", batch=32, precision="bf16",
                                                          variants=["eager", "eager_ckpt_heads", "eager_ckpt_all"]),
         None),
        ("gpu_loader", "bench_gpu_data", dict(files=256, batch=64, workers=8), None),
        ("gpu_vit_large_b64_bf16_modes", "bench_gpu", dict(config="vit_large", batch=64, precision="bf16",
                                                           variants=["compile"], compile_mode="max-autotune"), None),
    ],
}
TIMEOUT_S = {"smoke": 240, "quick": 400, "full": 1200, "gpu": 1500}


# ----------------------------------------------------------------------------------------------- child side
def _child(jobs: list) -> None:
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(REPO))
    for name, target, kwargs in jobs:
        module, _, func = target.partition(":")
        t0 = time.time()
        try:
            result = getattr(importlib.import_module(module), func or "run")(**kwargs)
            result = {"ok": True, "params": kwargs, "wall_s": round(time.time() - t0, 2), **result}
        except Exception as exc:  # report, keep the other jobs
            result = {"ok": False, "params": kwargs, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=8)}
        try:
            result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            pass
        print(MARK + json.dumps({"name": name, "result": result}), flush=True)


# ---------------------------------------------------------------------------------------------- parent side
def _run_group(jobs: list, timeout: float, threads: int = 0, max_wait: float = 0.0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps([[n, m, kw] for n, m, kw in jobs])]
    busy, waited = wait_for_idle(max_wait) if max_wait > 0 else (cpu_busy(), 0.0)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", BENCH_WAIT_IDLE=str(max_wait))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, rc = f"timed out after {timeout} s", None
    results = {}
    for line in stdout.splitlines():
        if line.startswith(MARK):
            item = json.loads(line[len(MARK):])
            results[item["name"]] = item["result"]
    for name, _, kw in jobs:
        if name not in results:
            results[name] = {"ok": False, "params": kw, "error": f"process exited with {rc} without a result",
                             "stderr_tail": stderr[-2000:]}
        results[name]["cpu_busy_before"] = busy  # other processes' share of the CPUs just before the job
        results[name]["waited_for_idle_s"] = waited
    sys.stderr.write(f"[bench] {', '.join(n for n, _, _ in jobs)}: {time.time() - t0:.1f} s (CPU busy before: "
                     f"{busy if busy is None else f'{busy:.0%}'})\n")
    return results


def _git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=str(REPO), capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(status) if status is not None else None}


# -------------------------------------------------------------------------------------------- targets
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def evaluate_targets(b: dict, suite: str) -> list:
    """The SPEC section-8 targets, each with the measured value and met / not met.

    ``exact`` is True when the suite measured the target's own configuration (full suite); otherwise the row
    is indicative (smaller sizes).
    """
    rows = []

    def add(what, value, goal, met, exact, note=""):
        rows.append({"target": what, "measured": value, "goal": goal,
                     "met": None if met is None else bool(met), "exact_config": exact, "note": note})

    def launched(name: str) -> tuple[dict, str]:
        """Ours as main_pretrain.py runs it (``*_launch`` job, --cpu_allocator reuse) when measured, else the
        code-only figure of the shared process."""
        job = b.get(name + "_launch", {})
        if job.get("ok"):
            return job["variants"], "as launched (--cpu_allocator reuse) vs the baseline with glibc defaults"
        return b[name]["variants"], "same process, glibc defaults for both"

    vb = b.get("step_vit_base", {})
    if vb.get("ok"):
        exact = vb["batch"] == 2 and vb["input_size"] == 224
        ours, how = launched("step_vit_base")
        base = vb["variants"]["baseline_fp32"]["s_per_step"]
        fp = ours["ours_fp32"]["s_per_step"]
        add(f"ViT-B 224->448 b{vb['batch']} fp32 step, ours / baseline", fp / base, "<= 0.70", fp / base <= 0.7,
            exact, f"{fp:.2f} vs {base:.2f} s; {how}")
        r = vb.get("ratio_ours_fp32_vs_baseline")
        add(f"ViT-B b{vb['batch']} fp32 step, code only (one process, glibc defaults)", r, "-", None, exact,
            f"{vb['variants']['ours_fp32']['s_per_step']:.2f} vs {base:.2f} s")
        lc = vb["loss_check"]
        add("ViT-B equal loss (relative difference)", lc["rel_diff"], "<= 1e-5", lc["equal"], True)
        bf = ours["ours_bf16"]["s_per_step"]
        add(f"ViT-B b{vb['batch']} bf16 autocast step (s)", bf, "< fp32 and < 2.3 s (b2)",
            bf < fp and (bf < 2.3 if exact else True), exact, f"fp32 {fp:.2f} s")
    st = b.get("step_tiny", {})
    if st.get("ok"):
        exact = st["config"] == "tiny" and st["batch"] == 8
        ours, how = launched("step_tiny")
        base = st["variants"]["baseline_fp32"]["s_per_step"]
        s = ours["ours_fp32"]["s_per_step"]
        add(f"{st['config']} {st['input_size']}->{st['target_size']} b{st['batch']} step, ours / baseline", s / base,
            "<= 0.70", s / base <= 0.7, exact, f"{s * 1000:.1f} ms vs {base * 1000:.1f} ms; {how}"
            + (f"; original 88 ms -> goal <= 62 ms ({'met' if s <= 0.0616 else 'not met'})" if exact else ""))
        r = st.get("ratio_ours_fp32_vs_baseline")
        add(f"{st['config']} step, code only (one process, glibc defaults)", r, "-", None, exact,
            f"{st['variants']['ours_fp32']['s_per_step'] * 1000:.1f} ms vs {base * 1000:.1f} ms")
        add(f"{st['config']} equal loss (relative difference)", st["loss_check"]["rel_diff"], "<= 1e-5",
            st["loss_check"]["equal"], True)
    m0, m1 = b.get("memory_plain", {}), b.get("memory_grad_ckpt", {})
    if m0.get("ok") and m1.get("ok"):
        red = 1 - m1["peak_rss_gib"] / m0["peak_rss_gib"]
        red_act = 1 - m1["activations_gib"] / m0["activations_gib"] if m0["activations_gib"] > 0 else None
        exact = m0["config"] == "vit_base" and m0["batch"] == 4 and m0["input_size"] == 224
        add(f"--grad_checkpointing peak RSS reduction ({m0['config']} {m0['input_size']} b{m0['batch']})", red,
            ">= 0.40", red >= 0.4, exact, f"peak {m0['peak_rss_gib']:.2f} -> {m1['peak_rss_gib']:.2f} GiB")
        if red_act is not None:
            add("--grad_checkpointing activation-memory reduction (peak - model - grads - AdamW state)", red_act,
                ">= 0.40", red_act >= 0.4, exact,
                f"{m0['activations_gib']:.2f} -> {m1['activations_gib']:.2f} GiB")
        if "cuda_max_allocated_gib" in m0 and "cuda_max_allocated_gib" in m1:
            red_cuda = 1 - m1["cuda_max_allocated_gib"] / m0["cuda_max_allocated_gib"]
            add("--grad_checkpointing CUDA max allocated reduction", red_cuda, ">= 0.40", red_cuda >= 0.4, exact)
    d = b.get("data", {})
    if d.get("ok") and "ratio_ours_vs_original" in d:
        exact = d["batch"] == 32 and d["workers"] == 2 and d["input_size"] == 224 and d["files"] >= 64
        r = d["ratio_ours_vs_original"]
        add("data pipeline, ours / original-style (img/s)", r, ">= 2.0", r >= 2.0, exact,
            f"{d['pipelines']['ours']['images_per_s']:.0f} vs {d['pipelines']['original']['images_per_s']:.0f} img/s")
        if "ratio_ours_vs_decode_tensor" in d:
            r = d["ratio_ours_vs_decode_tensor"]
            add("data pipeline, ours / decode-only (same decoder)", r, ">= 0.85", r >= 0.85, exact,
                f"decode-only {d['pipelines']['decode_tensor']['images_per_s']:.0f} img/s")
    k = b.get("knn", {})
    if k.get("ok"):
        exact = k["bank"] == 100000 and k["queries"] == 10000 and k["dim"] == 1024 and k["k"] == 20
        add(f"kNN {k['bank']}/{k['queries']} {k['dim']}-d k={k['k']} time (s)", k["seconds"], "<= 5 s",
            k["seconds"] <= 5, exact, "original 21-25 s" if exact else "")
        add("kNN extra memory (GiB)", k["extra_rss_gib"], "<= 0.6 GiB", k["extra_rss_gib"] <= 0.6, exact,
            "original +0.5 GiB" if exact else "")
    f = b.get("features", {})
    if f.get("ok"):
        res = f["results"]
        has_bf16 = any(v["precision"] == "bf16" for v in res.values())
        add("kNN features: bf16 option", has_bf16, "available", has_bf16, True)
        if f["config"] == "vit_large":
            fl = b.get("features_launch", {})
            launched = fl["results"] if fl.get("ok") and fl.get("config") == "vit_large" else None
            for side, orig in ORIGINAL["vit_large_features_fp32_images_per_s"].items():
                code = _get(res, f"ours_fp32@{side}", "images_per_s")
                v = _get(launched, f"ours_fp32@{side}", "images_per_s") if launched else code
                if v is not None:
                    how = (f"as launched (--cpu_allocator reuse); code only {code:.2f}" if launched and code
                           else "code only (glibc defaults)")
                    add(f"ViT-L features fp32 @{side} px (img/s)", v, f">= {orig} (original)", v >= orig, True, how)
    rows += gpu_targets(b)
    return rows


def gpu_targets(b: dict) -> list:
    """Issue-14 targets of the gpu suite (indicative, ``exact_config`` False, when run with --quick or on CPU)."""
    rows = []

    def add(what, value, goal, met, exact, note=""):
        rows.append({"target": what, "measured": value, "goal": goal,
                     "met": None if met is None else bool(met), "exact_config": exact, "note": note})

    big = b.get("gpu_vit_large_b64_bf16", {})
    if big.get("ok"):
        exact = big["device_type"] == "cuda" and not big["quick"]
        v = big["variants"]
        best = max((e["images_per_s"], n) for n, e in v.items() if n != "baseline")
        if "baseline" in v:
            r = best[0] / v["baseline"]["images_per_s"]
            add("ViT-L b64 bf16 step, ours best / baseline (img/s)", r, ">= 2.0", r >= 2.0, exact,
                f"{best[0]:.0f} ({best[1]}) vs {v['baseline']['images_per_s']:.0f} img/s")
        mfu = max((e["mfu_datasheet"] or 0.0) for n, e in v.items() if n != "baseline") or None
        add("ViT-L b64 bf16 MFU (datasheet peak)", mfu, ">= 0.35", None if mfu is None else mfu >= 0.35, exact)
        if "speedup_compile_vs_eager" in big:
            r = big["speedup_compile_vs_eager"]
            add("ViT-L b64 bf16 compiled / eager (img/s)", r, ">= 1.0", r >= 1.0, exact)
    ck = b.get("gpu_vit_large_b32_bf16_ckpt", {})
    if ck.get("ok"):
        exact = ck["device_type"] == "cuda" and not ck["quick"]
        v = ck["variants"]
        key = "peak_memory_gib" if "peak_memory_gib" in v.get("eager", {}) else None
        for scope in ("heads", "all"):
            e = v.get(f"eager_ckpt_{scope}")
            if e is None or "eager" not in v:
                continue
            cost = e["s_per_step"] / v["eager"]["s_per_step"] - 1
            saved = 1 - e[key] / v["eager"][key] if key else None
            met = cost <= 0.35 and saved is not None and saved >= 0.25
            add(f"--grad_checkpointing {scope}: time cost / memory saved (ViT-L b32 bf16)", cost,
                "<= 0.35 time for >= 0.25 memory", met if key else None, exact,
                f"memory saved {saved:.0%}" if saved is not None else "peak memory: CUDA only")
    return rows


# ------------------------------------------------------------------------------------------- markdown
def _f(v, fmt="{:.3g}"):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def to_markdown(report: dict) -> str:
    b, m = report["benchmarks"], report.get("machine") or {}
    out = [f"# Scale-MAE benchmarks: suite `{report['suite']}` ({report['timestamp']})", "",
           f"Machine: {m.get('device', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')} "
           f"({m.get('torch_threads', '?')} threads), timm {m.get('timm', '?')}; load average at start "
           f"{report.get('load_average_start')}, git {report['git'].get('commit')}"
           f"{' (dirty)' if report['git'].get('dirty') else ''}. Wall time {report['wall_s']:.0f} s.", ""]
    busy = {n: v.get("cpu_busy_before") for n, v in b.items() if v.get("cpu_busy_before") is not None}
    if busy:
        out += ["CPU share used by other processes just before each benchmark: "
                + ", ".join(f"{n} {v:.0%}" for n, v in busy.items()) + "."
                + (" **Other processes were busy: these timings are unreliable (see bench/README.md).**"
                   if max(busy.values()) > 0.25 else ""), ""]
    out += ["## Targets (SPEC section 8)", "", "| target | measured | goal | met | config | note |",
            "|---|---|---|---|---|---|"]
    for r in report["targets"]:
        met = "-" if r["met"] is None else ("**met**" if r["met"] else "**not met**")
        out.append(f"| {r['target']} | {_f(r['measured'])} | {r['goal']} | {met} | "
                   f"{'target config' if r['exact_config'] else 'smaller (indicative)'} | {r['note']} |")
    out.append("")

    steps = [(n, v) for n, v in b.items() if n.startswith("step_") and v.get("ok")]
    if steps:
        out += ["## Pretraining step (fwd + bwd + AdamW), median s/step", "",
                "| config | in->target | batch | variant | allocator | s/step | img/s | fwd | bwd | optim | "
                "vs baseline fp32 |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, v in steps:
            code_job = b.get(n[:-len("_launch")], {}) if n.endswith("_launch") else v
            base = code_job.get("variants", {}).get("baseline_fp32", {}).get("s_per_step")
            for name, var in v["variants"].items():
                bd = var["breakdown_median_s"]
                ratio = var["s_per_step"] / base if base else None
                out.append(f"| {v['config']} | {v['input_size']}->{v['target_size']} | {v['batch']} | {name} | "
                           f"{v.get('allocator', 'system')} | {var['s_per_step']:.3f} | {var['images_per_s']:.1f} | "
                           f"{bd['forward']:.3f} | {bd['backward']:.3f} | {bd['optimizer']:.3f} | "
                           f"{_f(ratio, '{:.2f}x')} |")
        out.append("")
        for n, v in steps:
            out.append(f"- {n}: medians over {v['median_over']} ({v['clean_rounds']} of {v['iters']} rounds "
                       f"with < 10% CPU used by other processes; per round: {v['other_load_per_round']})")
        for n, v in steps:
            lc = v["loss_check"]
            if lc.get("rel_diff") is None:
                continue
            out.append(f"- {v['config']} loss check (same weights/batch/noise): ours {lc['loss_ours_fp32']:.6f}, "
                       f"baseline {lc['loss_baseline_fp32']:.6f}, relative difference {lc['rel_diff']:.2e} "
                       f"({'equal' if lc['equal'] else 'NOT equal'} at 1e-5); bf16 vs fp32 {lc['rel_diff_bf16']:.1e}")
        out.append("- allocator `reuse` = what `main_pretrain.py --device cpu` sets up (`--cpu_allocator reuse`, "
                   "util/cpu_memory.py); `system` = glibc's defaults, as the original runs. A `_launch` job runs "
                   "in a process of its own; its ratio is against the baseline of the `system` process.")
        out += ["", f"Original: ViT-B 224->448 b2 fp32 {ORIGINAL['vit_base_fp32_b2_s']} s, bf16 "
                f"{ORIGINAL['vit_base_bf16_b2_s']} s; tiny 64->128 b8 {ORIGINAL['tiny_b8_s']} s.", ""]

    mems = [(n, v) for n, v in b.items() if n.startswith("memory_") and v.get("ok")]
    if mems:
        out += ["## Peak memory of a training step (fresh process each)", "",
                "| variant | allocator | config | input | batch | RSS after build (GiB) | peak RSS (GiB) | "
                "peak - build (GiB) | of which grads + AdamW (GiB) | activations (GiB) | step s | CUDA max alloc (GiB) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, v in mems:
            out.append(f"| {n} | {v.get('allocator', 'system')} | {v['config']} | {v['input_size']} | {v['batch']} | "
                       f"{v['rss_model_gib']:.2f} | "
                       f"{v['peak_rss_gib']:.2f} | {v['step_rss_gib']:.2f} | {v['grads_and_adam_state_gib']:.2f} | "
                       f"{v['activations_gib']:.2f} | {v['last_step_s']:.2f} | "
                       f"{_f(v.get('cuda_max_allocated_gib'), '{:.2f}')} |")
        out += ["", f"Original peak RSS: {ORIGINAL['peak_rss_gib_b2']} GiB (b2), {ORIGINAL['peak_rss_gib_b4']} GiB "
                "(b4).", ""]

    d = b.get("data", {})
    if d.get("ok"):
        out += [f"## Data pipeline ({d['files']} JPEGs {d['sizes']} px, mean {d['mean_file_kib']:.0f} KiB; batch "
                f"{d['batch']}, {d['workers']} workers, {d['input_size']}<-{d['target_size']} px)",
                "", "| pipeline | img/s (steady) | img/s incl. start-up | vs original-style | vs decode-only | "
                "clean runs |", "|---|---|---|---|---|---|"]
        p = d["pipelines"]
        orig = p.get("original", {}).get("images_per_s")
        dec = p.get("decode_tensor", {}).get("images_per_s")
        for name, v in p.items():
            out.append(f"| {name} | {v['images_per_s']:.1f} | {v['images_per_s_incl_startup']:.1f} | "
                       f"{_f(v['images_per_s'] / orig if orig else None, '{:.2f}x')} | "
                       f"{_f(v['images_per_s'] / dec if dec else None, '{:.2f}')} | "
                       f"{v.get('clean_runs', '-')}/{len(v.get('runs', [])) or '-'} |")
        out += ["", f"Original: {ORIGINAL['data_images_per_s']} img/s; PIL decode alone ~330 img/s at 600 px, "
                "85-100 at 1200 px.", ""]

    knns = [(n, v) for n, v in b.items() if n.startswith("knn") and v.get("ok")]
    if knns:
        out += ["## kNN (k=20, random features)", "", "| method | bank / queries / dim | seconds | queries/s | "
                "extra RSS (GiB) | agreement with ours | clean runs |", "|---|---|---|---|---|---|---|"]
        for n, v in knns:
            out.append(f"| {v['method']} | {v['bank']} / {v['queries']} / {v['dim']} | {v['seconds']:.2f} | "
                       f"{v['queries_per_s']:.0f} | {v['extra_rss_gib']:.2f} | "
                       f"{_f(v.get('prediction_agreement_with_ours'), '{:.4f}')} | "
                       f"{v['clean_runs']}/{len(v['runs'])} |")
        out += ["", f"Original (100k/10k/1024): {ORIGINAL['knn_100k_10k_s']} s, +{ORIGINAL['knn_100k_10k_extra_gib']} "
                "GiB. `bf16_probe` is not a project function: the same search with a bf16 similarity matmul.", ""]

    f = b.get("features", {})
    if f.get("ok"):
        res = dict(f["results"])
        fl = b.get("features_launch", {})
        if fl.get("ok") and fl.get("config") == f["config"]:  # ours as the launchers run it (--cpu_allocator reuse)
            res.update({f"launched_{v['precision']}@{v['side']}": {**v, "who": "launched"}
                        for v in fl["results"].values()})
        sides = sorted({v["side"] for v in res.values()})
        cols = sorted({(v["who"], v["precision"]) for v in res.values()}, key=lambda c: (c[0] != "ours", c[1]))
        head = " | ".join(f"{w} {p}" for w, p in cols)
        out += [f"## kNN features (`extract_features`, {f['config']}, batch per side {f['batch']}), img/s", "",
                f"| side | {head} |" + (" original fp32 (ViT-L) |" if f["config"] == "vit_large" else ""),
                "|---|" + "---|" * len(cols) + ("---|" if f["config"] == "vit_large" else "")]
        for s in sides:
            row = " | ".join(_f(_get(res, f"{w}_{p}@{s}", "images_per_s"), "{:.2f}") for w, p in cols)
            orig = ORIGINAL["vit_large_features_fp32_images_per_s"].get(str(s))
            out.append(f"| {s} | {row} |" + (f" {_f(orig)} |" if f["config"] == "vit_large" else ""))
        out.append("")

    gpus = [(n, v) for n, v in b.items() if n.startswith("gpu_") and v.get("ok") and "variants" in v]
    if gpus:
        out += ["## Pretraining step on the accelerator (fwd + bwd + AdamW), median of per-step times", "",
                "| job | device | config | batch | precision | variant | img/s | s/step | TFLOP/s | MFU datasheet | "
                "MFU vs GEMM | peak mem (GiB) | first step s | vs baseline |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, v in gpus:
            base = v["variants"].get("baseline", {}).get("images_per_s")
            for name, e in v["variants"].items():
                mem = e.get("peak_memory_gib", e.get("peak_rss_gib_process"))
                label = name + (f" ({v['compile_mode']}, {v['compile_backend']})" if name.startswith("compile")
                                else "")
                out.append(f"| {n} | {v['device']} | {v['config']} {v['input_size']}->{v['target_size']} | "
                           f"{v['batch']} | {v['precision']} | {label} | {e['images_per_s']:.1f} | "
                           f"{e['s_per_step']:.4f} | {e['tflops']:.3g} | {_f(e['mfu_datasheet'], '{:.1%}')} | "
                           f"{e['mfu_measured_gemm']:.1%} | {_f(mem, '{:.2f}')} | {e['first_step_s']:.1f} | "
                           f"{_f(e['images_per_s'] / base if base else None, '{:.2f}x')} |")
        v0 = gpus[0][1]
        out += ["", f"FLOPs: {v0['flop_count']}; {v0['flops_per_image'] / 1e9:.3g} GFLOP per image for "
                f"{v0['config']}. GEMM peak measured in each job ({v0['gemm_tflops']:.3g} TFLOP/s in the first)."
                + (" **--quick: tiny config, CPU-safe plumbing check; the numbers mean nothing.**"
                   if v0["quick"] else ""), ""]

    gl = b.get("gpu_loader", {})
    if gl.get("ok"):
        p = gl["pipelines"]
        out += [f"## Loader feeding the accelerator ({gl['files']} JPEGs {gl['sizes']} px, batch {gl['batch']}, "
                f"{gl['workers']} workers, {gl['input_size']} px input, device {gl['device']})", "",
                "| pipeline | img/s |", "|---|---|"] + [f"| {k} | {v['images_per_s']:.1f} |" for k, v in p.items()]
        out += ["", "Compare with the model's img/s above: the slower of the two bounds end-to-end training.", ""]

    errors = [(n, v) for n, v in b.items() if not v.get("ok")]
    if errors:
        out += ["## Errors", ""] + [f"- `{n}`: {v.get('error')}" for n, v in errors] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="quick")
    ap.add_argument("--out", default=str(BENCH / "results"), help="folder for <suite>-<timestamp>.json/.md")
    ap.add_argument("--only", default="", help="comma-separated job names (machine is always run)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in the benchmark processes (default: torch's default, one per core)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each benchmark wait up to S seconds until other processes use < 25%% of the CPUs")
    ap.add_argument("--quick", action="store_true",
                    help="gpu suite: tiny model, batch 2, aot_eager compile, jobs run concurrently (a CPU smoke test)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0

    jobs = SUITES[args.suite]
    if args.only:
        wanted = {j.strip() for j in args.only.split(",")} | {"machine"}
        unknown = wanted - {n for n, *_ in jobs}
        if unknown:
            ap.error(f"unknown job(s) {sorted(unknown)} for suite {args.suite}; have {[n for n, *_ in jobs]}")
        jobs = [j for j in jobs if j[0] in wanted]
    if args.quick:
        if args.suite != "gpu":
            ap.error("--quick applies to --suite gpu")
        # one process; only the first job compiles (each compile of a new model retraces), no mode comparison
        quick_jobs, compiled = [], False
        for n, m, kw, g in jobs:
            if m == "bench_gpu_data":
                kw = {**kw, "quick": True}
            if m == "bench_gpu":
                variants = [v for v in kw.get("variants", ("baseline", "eager", "compile"))
                            if compiled is False or not v.startswith("compile")]
                compiled = compiled or any(v.startswith("compile") for v in variants)
                if not variants:
                    continue
                kw = {**kw, "quick": True, "variants": variants}
            quick_jobs.append((n, m, kw, "quick"))
        jobs = quick_jobs
    groups: dict = {}
    for i, (name, module, kwargs, group) in enumerate(jobs):
        groups.setdefault(group if group is not None else f"#{i}", []).append((name, module, kwargs))

    t0 = time.time()
    start = _dt.datetime.now()
    try:
        load_start = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_start = []
    timeout = TIMEOUT_S[args.suite]
    results: dict = {}
    if args.suite == "smoke" or args.quick:  # concurrent: only checks that everything runs
        with ThreadPoolExecutor(len(groups)) as pool:
            for r in pool.map(lambda g: _run_group(g, timeout, threads=args.threads or 1), groups.values()):
                results.update(r)
    else:
        for g in groups.values():
            results.update(_run_group(g, timeout, threads=args.threads, max_wait=args.wait_idle))
    machine = results.pop("machine", {})
    benchmarks = {name: results[name] for name, *_ in jobs if name in results}
    report = {
        "suite": args.suite,
        "quick": args.quick,
        "timestamp": start.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {k: v for k, v in machine.items() if k not in ("params", "wall_s")} if machine.get("ok") else
        machine,
        "git": _git_state(),
        "load_average_start": load_start,
        "threads_requested": args.threads or None,
        "original": ORIGINAL,
        "benchmarks": benchmarks,
        "wall_s": time.time() - t0,
    }
    report["targets"] = evaluate_targets(benchmarks, args.suite)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{args.suite}{'-quick' if args.quick else ''}-{start.strftime('%Y%m%d-%H%M%S')}"
    text = json.dumps(report, indent=1)
    stem.with_suffix(".json").write_text(text + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report) + "\n")
    print(text)
    sys.stderr.write(f"[bench] wrote {stem}.json and {stem}.md ({report['wall_s']:.0f} s)\n")
    return 0 if all(v.get("ok") for v in benchmarks.values()) and machine.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
