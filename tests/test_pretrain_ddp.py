"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def common(out: Path, batch: int) -> list[str]:
    return ["--config", str(REPO / "config" / "demo.yaml"), "--model", "mae_vit_tiny_patch16", "--input_size", "32",
            "--batch_size", str(batch), "--epochs", "1", "--warmup_epochs", "0", "--device", "cpu",
            "--num_workers", "1", "--output_dir", str(out), "--log_dir", str(out), "--skip_knn_eval",
            "--print_freq", "100", "--data_override", "data.length=64", "--blr", "1e-3"]


def test_two_process_gloo_equals_single_process(tmp_path):
    script = str(REPO / "main_pretrain.py")
    run([sys.executable, script, *common(tmp_path / "single", 16)], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
         *common(tmp_path / "ddp", 8)], tmp_path)
    single = torch.load(tmp_path / "single" / "checkpoint-latest.pth", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint-latest.pth", weights_only=True)
    assert ddp["args"]["world_size"] == 2 and ddp["args"]["distributed"] is True
    assert single["args"]["world_size"] == 1
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    loss_1 = json.loads((tmp_path / "single" / "log.txt").read_text().splitlines()[0])["train_loss"]
    loss_2 = json.loads((tmp_path / "ddp" / "log.txt").read_text().splitlines()[0])["train_loss"]
    assert abs(loss_1 - loss_2) <= 1e-5 * abs(loss_1), (loss_1, loss_2)
