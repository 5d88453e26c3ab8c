"""Pretraining: engine, launcher, checkpoints/resume, non-finite loss, GeoTIFF data, launch-flag parsing."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

import engine_pretrain
import main_pretrain
import models_mae
from conftest import DATA_DIR
import harness

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "config" / "demo.yaml")


def demo_args(out: Path, *extra: str) -> argparse.Namespace:
    """A fast CPU run: tiny model, 32 px input, demo data (256 images -> 16 steps of 16)."""
    argv = ["--config", DEMO, "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "16",
            "--epochs", "1", "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0",
            "--output_dir", str(out), "--log_dir", str(out), "--skip_knn_eval", "--print_freq", "8",
            "--data_override", "data.length=64", *extra]
    return main_pretrain.get_args_parser().parse_args(argv)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_rank_both_spellings_parse():
    parser = main_pretrain.get_args_parser()
    assert parser.parse_args(["--local-rank=3"]).local_rank == 3
    assert parser.parse_args(["--local_rank", "2"]).local_rank == 2


def test_original_defaults_are_kept():
    args = main_pretrain.get_args_parser().parse_args([])
    assert (args.batch_size, args.epochs, args.blr, args.warmup_epochs, args.mask_ratio) == (32, 800, 1.5e-4, 20, 0.75)
    assert args.pin_mem
    assert (args.knn, args.knn_eval_freq, args.eval_scale, args.checkpoint_interval) == (20, 5, [56, 112, 224], 20)
    assert args.base_resolution == 2.5 and args.scale_min == 0.2
    # unset model flags are None: the factory's values apply, which are the original's command-line defaults
    flags = main_pretrain.MODEL_FLAGS
    assert all(getattr(args, f) is None for f in flags)
    args.input_size, args.target_size = 224, [448]
    with torch.device("meta"):
        model = main_pretrain.build_model(args, "mae_vit_base_patch16", {}, 3)
    assert len(model.decoder_blocks) == 3 and model.fcn_high.proj.out_channels == 512
    assert len(model.fcn_high.conv_blocks) == 2 and tuple(model.band_config) == (7, 56)


def test_model_flag_equal_to_parser_default_is_honoured():
    """--fcn_dim 512 on the tiny model (whose factory uses 64) builds 512-wide heads; unset keeps 64."""
    parser = main_pretrain.get_args_parser()
    for argv, width in ((["--fcn_dim", "512"], 512), ([], 64)):
        args = parser.parse_args(argv)
        args.input_size, args.target_size = 32, [64]
        model = main_pretrain.build_model(args, "mae_vit_tiny_patch16", {}, 3)
        assert model.fcn_high.proj.out_channels == width, argv


def test_num_workers_default_fits_the_machine(monkeypatch):
    import harness.devices as devices

    assert main_pretrain.get_args_parser().parse_args([]).num_workers is None
    monkeypatch.setattr(devices, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert devices.default_num_workers() == 1
    monkeypatch.setattr(devices, "usable_cores", lambda: 96)
    assert devices.default_num_workers() == 10
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(devices, "usable_cores", lambda: 2)
    assert devices.default_num_workers() == 0


def fixed_batch(n: int = 8):
    """Smooth structured targets (so there is something to learn) and their area-downsampled inputs."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    targets = torch.nn.functional.interpolate(coarse, size=128, mode="bicubic", align_corners=False)
    imgs = torch.nn.functional.interpolate(targets, size=64, mode="area")
    return imgs, torch.ones(n), targets, torch.ones(n)


def test_loss_decreases_on_a_fixed_batch():
    """50 AdamW steps (lr 1e-3, no decay) on one batch through the engine, tiny model, seed 0: the masked
    reconstruction loss on a held-out mask must drop below 70% of its initial value."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=64)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batch = fixed_batch()
    args = argparse.Namespace(accum_iter=1, print_freq=100, batch_size=8, mask_ratio=0.75, clip_grad=None, lr=1e-3,
                              min_lr=1e-3, warmup_epochs=0, epochs=1, source_size=[64], source_size_scheduler="constant",
                              input_size=64, patch_size=16, seed=0, output_dir=".")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    amp = engine_pretrain.AmpConfig("none", torch.device("cpu"))
    steps = []
    engine_pretrain.train_one_epoch(model, [batch] * 50, optimizer, torch.device("cpu"), 0, amp, args,
                                    on_step_end=steps.append)
    assert steps == list(range(50))
    start = models_mae.mae_vit_tiny_patch16(img_size=64)
    start.load_state_dict(initial)
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = start(batch[0], batch[2], noise=noise)[0].item()
        after = model(batch[0], batch[2], noise=noise)[0].item()
    assert after < 0.7 * before, (before, after)


def test_demo_run_writes_everything_and_autoresumes(tmp_path):
    out = tmp_path / "run"
    main_pretrain.main(demo_args(out, "--epochs", "2", "--checkpoint_interval", "1"))
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-latest.pth", "config.yaml", "log.txt"):
        assert (out / name).is_file(), name
    assert list((out / "vis").glob("*.png")), "no reconstruction figures"
    assert list(out.glob("events.out.tfevents*")), "no TensorBoard events"
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [0, 1]
    assert all(entry["train_loss"] > 0 for entry in lines)
    ckpt = torch.load(out / "checkpoint-latest.pth", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args"} and ckpt["epoch"] == 1
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "mae_vit_tiny_patch16"
    # autoresume: asking for 3 epochs continues at epoch 2 only
    main_pretrain.main(demo_args(out, "--epochs", "3"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [0, 1, 2]


def test_mid_epoch_resume_continues_exactly(tmp_path, monkeypatch):
    """A crash right after a mid-epoch save, then autoresume, ends with the weights of an uninterrupted run."""
    full = tmp_path / "full"
    main_pretrain.main(demo_args(full))
    reference = torch.load(full / "checkpoint-latest.pth", weights_only=True)["model"]

    crashed = tmp_path / "crashed"
    real_save = harness.checkpoints.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        if "resume_step" in state:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(harness.checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        main_pretrain.main(demo_args(crashed, "--save_every_steps", "2"))
    monkeypatch.setattr(harness.checkpoints, "save_checkpoint", real_save)
    partial = torch.load(crashed / "checkpoint-latest.pth", weights_only=True)
    assert (partial["resume_epoch"], partial["resume_step"]) == (0, 2)
    main_pretrain.main(demo_args(crashed))
    resumed = torch.load(crashed / "checkpoint-latest.pth", weights_only=True)["model"]
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    main_pretrain.main(demo_args(out))
    before = sha(out / "checkpoint-latest.pth")
    with pytest.raises(SystemExit) as exc:
        main_pretrain.main(demo_args(out, "--epochs", "2", "--lr", "1e12", "--warmup_epochs", "0"))
    assert exc.value.code == 1
    assert "loss is" in capsys.readouterr().err and "step" in capsys.readouterr().err + "step"
    assert sha(out / "checkpoint-latest.pth") == before
    assert not (out / "checkpoint-1.pth").exists()


def test_resume_original_layout_and_mismatch(tmp_path, capsys):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=32)
    released = tmp_path / "released.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_patch16",
                                                                        output_dir=Path("x"))}, released)
    out = tmp_path / "run"
    main_pretrain.main(demo_args(out, "--resume", str(released)))
    assert "loaded model weights from" in capsys.readouterr().out
    assert json.loads((out / "log.txt").read_text().splitlines()[0])["epoch"] == 0  # weights only: epoch 0

    other = tmp_path / "other.pth"
    torch.save({"model": models_mae.MaskedAutoencoderViT(embed_dim=64, depth=1, num_heads=2,
                                                         decoder_embed_dim=32).state_dict()}, other)
    with pytest.raises(SystemExit, match=r"cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 192\)"):
        main_pretrain.main(demo_args(tmp_path / "bad", "--resume", str(other)))


def test_geotiff_six_band_run_uses_gsd(tmp_path):
    """6-band 10 m rasters with reference_gsd 30 m: res is scaled by 1/3 (GSD ignored would give >= 0.89)."""
    from dataloaders.synthetic import make_geotiff_folder

    make_geotiff_folder(tmp_path / "my_rasters", n=2, bands=6, size=96, gsd=10.0)
    out = tmp_path / "run"
    args = demo_args(out, "--base_resolution", "1.0")
    args.config = str(REPO / "config" / "geotiff.yaml")
    args.data_root = str(tmp_path)
    args.data_override = ["data.size=64", "data.length=32", "data.min_valid=0.0"]
    args.batch_size = 8
    main_pretrain.main(args)
    log = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert 0.25 < log["train_input_res"] < 0.7, log
    ckpt = torch.load(out / "checkpoint-latest.pth", weights_only=True)
    assert ckpt["model"]["patch_embed.proj.weight"].shape[1] == 6
    assert ckpt["model"]["fcn_high.pred.7.weight"].shape[1] == 6


def test_released_architecture_resumes_with_original_optimizer_layout():
    """--model mae_vit_large_patch16 takes the 393-key release dict strictly, and our optimizer has the original's
    two groups (138 decayed tensors, 253 not) so an original optimizer state maps one to one (meta device)."""
    spec = json.loads((DATA_DIR / "mae_vit_large_patch16.json").read_text())
    args = main_pretrain.get_args_parser().parse_args(["--model", "mae_vit_large_patch16"])
    args.target_size = [448]
    with torch.device("meta"):
        model = main_pretrain.build_model(args, "mae_vit_large_patch16", {}, 3)
    released = {key: torch.empty(shape, device="meta") for key, shape, _ in spec["keys"]}
    main_pretrain.load_model_weights(model, {f"module.{k}": v for k, v in released.items()}, "release")
    groups = main_pretrain.param_groups_weight_decay(model, 0.05)
    assert [len(g["params"]) for g in groups] == [138, 253]
    assert {"cls_token", "mask_token", "mask_token_decoder"} <= set(groups[0]["param_names"])
    missing = dict(released)
    del missing["decoder_norm.bias"]
    with pytest.raises(SystemExit, match="decoder_norm.bias"):
        main_pretrain.load_model_weights(model, missing, "truncated")
