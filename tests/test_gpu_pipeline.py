"""The device-side pretraining pipeline (dataloaders/gpu_pipeline.py), run on CPU, reproduces the CPU pipeline:
same per-sample random choices (drawn from the JPEG header, without decoding), same pixels and res values."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from dataloaders.builders import build_pretrain_dataset, build_pretrain_sampler
from dataloaders.errors import DataError
from dataloaders.gpu_pipeline import build_gpu_pipeline_loader
from dataloaders.seeding import SeededDataset, SeededSampler


def _jpegs(root, sizes, suffix):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
        img = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i}{suffix}", quality=90)


def _args(**kw):
    base = dict(input_size=16, target_size=[32], scale_min=0.2, scale_max=1.0, base_resolution=2.5, world_size=1,
                rank=0, seed=3, batch_size=3, num_workers=0)
    return argparse.Namespace(**{**base, **kw})


def _cpu_batches(cfg, args, epoch):
    ds = build_pretrain_dataset(cfg, input_size=args.input_size, target_size=args.target_size[0],
                                scale_min=args.scale_min, scale_max=args.scale_max,
                                base_resolution=args.base_resolution, seed=args.seed)
    sampler = SeededSampler(build_pretrain_sampler(ds, cfg, seed=args.seed))
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(SeededDataset(ds, args.seed), sampler=sampler, batch_size=args.batch_size,
                                         drop_last=True)
    return list(loader)


@pytest.mark.parametrize("kind", ["fmow", "resisc"])
def test_device_pipeline_on_cpu_equals_the_cpu_pipeline(tmp_path, kind):
    # fmow: a random 32 px window (zero padded around the 20 px image, inside the 50 px ones) before the crop
    _jpegs(tmp_path, [(50, 60), (20, 26), (64, 40), (33, 33), (48, 56), (40, 70)],
           "_rgb.jpg" if kind == "fmow" else ".jpg")
    cfg = {"data": {"type": kind, "img_dir": str(tmp_path), "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}}
    args = _args()
    batches, sampler, steps = build_gpu_pipeline_loader(args, cfg, torch.device("cpu"))
    assert steps == 2 and len(batches) == 2
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        ours = list(batches)
        ref = _cpu_batches(cfg, args, epoch)
        assert len(ours) == len(ref) == 2
        for (imgs, in_res, tgt, t_res), (r_imgs, r_in_res, r_tgt, r_t_res) in zip(ours, ref):
            assert imgs.shape == (3, 3, 16, 16) and tgt.shape == (3, 3, 32, 32)
            torch.testing.assert_close(t_res, r_t_res)
            torch.testing.assert_close(in_res, r_in_res)
            torch.testing.assert_close(tgt, r_tgt, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(imgs, r_imgs, atol=1e-4, rtol=1e-5)
    assert not torch.equal(ours[0][2], _cpu_batches(cfg, args, 0)[0][2])  # epochs differ: the seeding is used


def test_device_pipeline_refuses_other_configs():
    cfg = {"data": {"type": "demo", "length": 8, "size": 32, "num_classes": 2, "seed": 0, "mean": [0.5] * 3,
                    "std": [0.2] * 3}}
    with pytest.raises(DataError, match="--gpu_pipeline"):
        build_gpu_pipeline_loader(_args(), cfg, torch.device("cpu"))


def test_main_pretrain_runs_with_the_device_pipeline(tmp_path):
    """``--gpu_pipeline`` end to end through the launcher (on CPU): one epoch on JPEGs, a finite loss logged."""
    import json

    import main_pretrain

    _jpegs(tmp_path / "imgs", [(40, 48)] * 8, ".jpg")
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"data:\n  type: resisc\n  img_dir: {tmp_path / 'imgs'}\n  mean: [0.5, 0.5, 0.5]\n"
                   f"  std: [0.2, 0.2, 0.2]\n")
    out = tmp_path / "run"
    argv = ["--config", str(cfg), "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4",
            "--epochs", "1", "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0", "--output_dir",
            str(out), "--log_dir", str(out), "--skip_knn_eval", "--print_freq", "1", "--gpu_pipeline"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert np.isfinite(stats["train_loss"]) and stats["epoch"] == 0
