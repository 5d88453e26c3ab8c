"""Two CPU processes under torchrun (gloo): segmentation trains (no rank-0-only collective), each rank writes the
predictions of its own validation tiles, and the metrics summed over ranks equal a one-process evaluation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def test_two_process_segmentation(tmp_path):
    from dataloaders.seg_synthetic import make_building_scenes

    scenes = make_building_scenes(tmp_path / "data", n_train=2, n_val=3, size=64, count=4)
    out = tmp_path / "ddp"
    flags = ["--config", str(scenes["config"]), "--model", "vit_tiny_patch16", "--allow_random_init", "--input_size", "32",
             "--batch_size", "4", "--epochs", "1", "--head_channels", "16", "--aux_channels", "8", "--device", "cpu",
             "--num_workers", "0", "--print_freq", "100", "--eval_scales", "1", "0.5", "--output_dir", str(out),
             "--data_override", "data.length=16", "data.size=32"]
    script = str(REPO / "main_segment.py")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *flags,
         "--log_dir", str(out), "--save_predictions"], tmp_path)
    assert sorted(p.name for p in (out / "predictions").glob("*.tif")) == [f"pred_tile_00{i}.tif" for i in range(3)]
    ddp = json.loads((out / "seg-epoch0001.json").read_text())
    import main_segment

    single = main_segment.main(main_segment.get_args_parser().parse_args([*flags, "--eval"]))["eval"]
    for key in ("1", "0.5"):
        assert ddp["scales"][key]["pixels"] == single["scales"][key]["pixels"] == 3 * 64 * 64
        assert abs(ddp["scales"][key]["miou"] - single["scales"][key]["miou"]) < 1e-9
