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
