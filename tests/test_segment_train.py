"""Segmentation training end to end on the synthetic building scenes: a tiny model learns the buildings, the
launcher writes georeferenced predictions, resumes, and reports bad input in one line."""
from __future__ import annotations

import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import main_segment
import models_seg
import models_vit
from dataloaders.config import load_seg_config
from dataloaders.segmentation import TileShardSampler, build_seg_datasets, seg_collate
from engine_segment import evaluate, train_one_epoch
from util.amp import AmpConfig

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from dataloaders.seg_synthetic import make_building_scenes

    return make_building_scenes(tmp_path_factory.mktemp("scenes"), n_train=3, n_val=2, size=96, count=5)


def test_tiny_model_learns_buildings(scenes):
    torch.manual_seed(0)
    cfg = load_seg_config(scenes["config"], overrides=["data.size=48", "data.length=96"])
    train_ds, val_ds, classes = build_seg_datasets(cfg, input_size=48, seed=0)
    backbone = models_vit.VisionTransformer(embed_dim=48, depth=4, num_heads=3, patch_size=8, img_size=48,
                                            num_classes=0)
    model = models_seg.SegmentationModel(backbone, 2, channels=32, aux_channels=16)
    args = Namespace(accum_iter=1, lr=2e-3, min_lr=0.0, warmup_epochs=0.2, epochs=3, print_freq=100,
                     ignore_index=255, dice_weight=0.5, aux_weight=0.4, clip_grad=1.0, batch_size=8,
                     layer_decay=1.0, weight_decay=0.01)
    opt = torch.optim.AdamW(main_segment.build_param_groups(model, args), lr=args.lr)
    sampler = train_ds.make_sampler(seed=0)
    loader = DataLoader(train_ds, sampler=sampler, batch_size=8, drop_last=True, collate_fn=seg_collate)
    val_loader = DataLoader(val_ds, sampler=TileShardSampler(val_ds.windows), batch_size=8, collate_fn=seg_collate)
    amp = AmpConfig("none", "cpu")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        train_one_epoch(model, loader, opt, torch.device("cpu"), epoch, amp, args)
    result = evaluate(model, val_loader, torch.device("cpu"), [1.0], classes, patch_size=8, object_class=1)
    native = result["scales"]["1"]
    # an all-background predictor has building IoU 0 (and mIoU = background share / 2, about 45 here)
    assert native["iou"]["building"] > 60, native
    assert native["miou"] > 75 and native["object_f1"] > 40


def run_main(scenes, out, *extra):
    argv = ["--config", str(scenes["config"]), "--model", "vit_tiny_patch16", "--allow_random_init", "--input_size", "64",
            "--batch_size", "4", "--epochs", "1", "--head_channels", "16", "--aux_channels", "8", "--device", "cpu",
            "--num_workers", "0", "--print_freq", "100", "--output_dir", str(out), "--log_dir", str(out),
            "--data_override", "data.length=8", "data.size=64", *extra]
    return main_segment.main(main_segment.get_args_parser().parse_args(argv))


def test_launcher_writes_georeferenced_predictions_and_resumes(scenes, tmp_path):
    import rasterio

    out = tmp_path / "run"
    res = run_main(scenes, out, "--save_predictions", "--polygonize", "--overlays", "--eval_scales", "1", "0.5")
    assert set(res["eval"]["scales"]) == {"1", "0.5"}
    assert res["eval"]["scales"]["0.5"]["input_px"] == 32
    for name in ("checkpoint-latest.pth", "config.yaml", "seg-epoch0001.md", "seg-epoch0001.json", "log.txt"):
        assert (out / name).is_file(), name
    for src_path in sorted((Path(scenes["val"])).glob("*.tif")):
        pred = out / "predictions" / f"pred_{src_path.stem}.tif"
        with rasterio.open(src_path) as src, rasterio.open(pred) as dst:
            assert dst.transform == src.transform and dst.crs == src.crs and dst.shape == src.shape
            assert dst.count == 1 and dst.dtypes[0] == "uint8"
        assert (out / "predictions" / f"pred_{src_path.stem}.gpkg").is_file()
        assert (out / "predictions" / f"overlay_{src_path.stem}.png").is_file()
    ckpt = torch.load(out / "checkpoint-latest.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["classes"] == ["background", "building"]
    # autoresume: nothing left to train; --eval evaluates the saved model
    again = run_main(scenes, out, "--eval")
    assert again["eval"]["scales"]["1"]["miou"] == pytest.approx(res["eval"]["scales"]["1"]["miou"])
    with pytest.raises(SystemExit, match=r"trained on classes \['background', 'building'\]"):
        run_main(scenes, out, "data.classes=[roof]", "data.class_column=null", "--eval")


def test_bad_input_is_one_line(scenes, tmp_path):
    from dataloaders.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key data\.colour"):
        run_main(scenes, tmp_path / "a", "data.colour=1")
    with pytest.raises(SystemExit, match="--batch_size 1: needs >= 2"):
        run_main(scenes, tmp_path / "b", "--batch_size", "1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(scenes["config"]).read_text().replace("buildings.geojson", "missing.geojson"))
    bad = bad.replace(Path(scenes["config"]).with_name("bad.yaml"))
    proc = subprocess.run([sys.executable, str(REPO / "main_segment.py"), "--config", str(bad), "--device", "cpu",
                           "--model", "vit_tiny_patch16", "--allow_random_init", "--output_dir", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.geojson: label file not found" in lines[0], proc.stderr
