"""The benchmark suite runs end to end (``bench/run.py --suite smoke``) and writes a well-formed report.

No timing assertions: only that every benchmark ran and produced positive numbers under the expected keys.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_smoke_suite_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--suite", "smoke", "--out",
                           str(tmp_path)], cwd=str(REPO), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(tmp_path.glob("smoke-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    report = json.loads(files[0].read_text())
    assert report == json.loads(proc.stdout)  # the JSON is also printed

    assert report["suite"] == "smoke"
    assert {"cpu_count", "torch", "device"} <= set(report["machine"])
    b = report["benchmarks"]
    assert set(b) == {"step_tiny", "step_tiny_launch", "memory_plain", "memory_grad_ckpt", "data", "knn", "features"}
    assert all(v["ok"] for v in b.values()), {k: v.get("error") for k, v in b.items()}

    step = b["step_tiny"]
    assert set(step["variants"]) == {"ours_fp32", "ours_bf16", "baseline_fp32"}
    for var in step["variants"].values():
        assert _positive(var["s_per_step"]) and _positive(var["images_per_s"])
    assert _positive(step["ratio_ours_fp32_vs_baseline"])
    assert step["loss_check"]["equal"] and step["loss_check"]["rel_diff"] <= 1e-5
    assert step["allocator"] == "system" and not step["allocator_applied"]
    launch = b["step_tiny_launch"]  # ours as main_pretrain runs it on CPU, in a process of its own
    assert set(launch["variants"]) == {"ours_fp32", "ours_bf16"}
    assert launch["allocator"] == "reuse" and launch["allocator_applied"] is sys.platform.startswith("linux")
    assert any("as launched" in t["note"] for t in report["targets"] if "ours / baseline" in t["target"])

    for name in ("memory_plain", "memory_grad_ckpt"):
        assert _positive(b[name]["peak_rss_gib"]) and _positive(b[name]["rss_model_gib"])
    assert b["memory_grad_ckpt"]["grad_checkpointing"] and not b["memory_plain"]["grad_checkpointing"]

    pipes = b["data"]["pipelines"]
    assert set(pipes) == {"decode_pil", "decode_tensor", "original", "ours"}
    assert all(_positive(p["images_per_s"]) for p in pipes.values())
    assert _positive(b["data"]["ratio_ours_vs_original"])

    assert _positive(b["knn"]["seconds"]) and b["knn"]["extra_rss_gib"] >= 0
    feats = b["features"]["results"]
    assert {v["precision"] for v in feats.values()} == {"fp32", "bf16"}
    assert all(_positive(v["images_per_s"]) for v in feats.values())

    assert report["targets"] and all({"target", "measured", "goal", "met"} <= set(t) for t in report["targets"])
    md = files[0].with_suffix(".md").read_text()
    assert "| target | measured | goal | met |" in md and "## Pretraining step" in md


def test_gpu_suite_quick_runs_on_cpu(tmp_path):
    """``--suite gpu --quick``: every job of the accelerator suite runs (tiny model, CPU when there is no GPU) and
    reports img/s, TFLOP/s from one FLOP count, MFU against the measured GEMM, memory and the baseline ratio."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--suite", "gpu", "--quick", "--out",
                           str(tmp_path)], cwd=str(REPO), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(tmp_path.glob("gpu-quick-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    report = json.loads(files[0].read_text())
    b = report["benchmarks"]
    assert {f"gpu_{c}_b{n}_bf16" for c in ("vit_base", "vit_large") for n in (32, 64)} <= set(b)
    assert all(v["ok"] for v in b.values()), {k: v.get("error") for k, v in b.items()}
    loader = b.pop("gpu_loader")  # the loader job: CPU pipeline and device pipeline img/s
    assert _positive(loader["pipelines"]["cpu"]["images_per_s"]) and _positive(loader["ratio_device_vs_cpu"])
    flops = {v["flops_per_image"] for v in b.values()}
    assert len(flops) == 1 and _positive(flops.pop())  # one count (the baseline's), whatever the variant
    first = b["gpu_vit_base_b32_bf16"]
    assert set(first["variants"]) == {"baseline", "eager", "compile"}
    assert first["variants"]["compile"]["compile_failed"] is None
    for job in b.values():
        assert job["quick"] and _positive(job["gemm_tflops"])
        for var in job["variants"].values():
            assert _positive(var["images_per_s"]) and _positive(var["tflops"]) and _positive(var["mfu_measured_gemm"])
            assert _positive(var.get("peak_memory_gib", var.get("peak_rss_gib_process")))
    assert b["gpu_vit_large_b32_fp16"]["precision"] == "fp16"
    assert {"eager_ckpt_heads", "eager_ckpt_all"} <= set(b["gpu_vit_large_b32_bf16_ckpt"]["variants"])
    assert _positive(first["speedup_eager_vs_baseline"])
    md = files[0].with_suffix(".md").read_text()
    assert "## Pretraining step on the accelerator" in md and "the numbers mean nothing" in md
