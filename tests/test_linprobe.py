"""main_linprobe.py / engine_finetune.py: linear probe, finetune, checkpoint loading, eval, resume, rank reduction.

Everything runs in-process on CPU with the tiny encoder ``vit_tiny_patch16`` (192-d, 4 blocks) at 64 px on
synthetic scenes (``dataloaders.synthetic.make_scene_folder``: 4 classes that differ in palette, orientation,
texture frequency and building density).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import main_linprobe
import models_mae
from engine_finetune import evaluate
from harness.pretrained import resolve_model_name
from ranks import free_port

NUM_CLASSES = 4


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train (4 x 12 images) and val (4 x 6, other generator seed) ImageFolders + a train config; a tiny MAE
    checkpoint in the original release layout ({'model': sd, 'args': Namespace})."""
    from dataloaders.synthetic import make_scene_folder

    root = tmp_path_factory.mktemp("linprobe")
    make_scene_folder(root / "train", NUM_CLASSES, per_class=12, size=64, seed=0)
    make_scene_folder(root / "val", NUM_CLASSES, per_class=6, size=64, seed=1)
    (root / "train.yaml").write_text(
        "data:\n  type: resisc\n  img_dir: train\n  mean: [0.4656, 0.4002, 0.3951]\n"
        "  std: [0.1974, 0.2090, 0.1965]\n")
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=64)
    ckpt = root / "mae_tiny.pth"
    torch.save({"model": mae.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_patch16")}, ckpt)
    return {"root": root, "mae_ckpt": ckpt, "mae_sd": mae.state_dict()}


def cli(data, out, *extra):
    root = data["root"]
    argv = ["--config", str(root / "train.yaml"), "--eval_dataset", "resisc", "--eval_path", str(root / "val"),
            "--model", "vit_tiny_patch16", "--input_size", "64", "--eval_scale", "64", "--device", "cpu",
            "--num_workers", "0", "--batch_size", "16", "--epochs", "1", "--blr", "0.1",
            "--base_resolution", "1.0", "--eval_base_resolution", "0.85",
            "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "100", *extra]
    return main_linprobe.get_args_parser().parse_args(argv)


def latest(out):
    return torch.load(out / "checkpoint-latest.pth", map_location="cpu", weights_only=True)


def encoder_keys(sd):
    return [k for k in sd if not k.startswith("head.")]


# ------------------------------------------------------------------------------------------------ flags
def test_original_flags_and_defaults():
    a = main_linprobe.get_args_parser().parse_args([])
    expected = dict(checkpoint_interval=20, batch_size=64, print_freq=20, drop_path=0.1, epochs=400, accum_iter=1,
                    config=None, name="", linear_layer_scale=1.0, wandb_id=None, input_size=224,
                    target_size=[224], source_size=[224], mask_ratio=0.75, scale_min=0.5, scale_max=1.0,
                    norm_pix_loss=False, restart=False, weight_decay=0.05, lr=None, blr=1e-3, layer_decay=0.75,
                    min_lr=0.0, warmup_epochs=0, output_dir=None, log_dir=None, device="cuda",
                    eval_only=False, eval_dataset=None, eval_path=None, eval_gsd=False,
                    eval_base_resolution=1.0, eval_reference_resolution=224, eval_scale=224, eval=False,
                    dist_eval=False, no_autoresume=False, seed=0, resume="", start_epoch=0, num_workers=None,
                    pin_mem=True, world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://",
                    base_resolution=2.5, finetune=False, checkpoint_path=None, global_pool=False,
                    # unset = None: the architecture of the checkpoint, classes from the dataset, data by the
                    # documented defaults (config/resisc.yaml, the val list next to the train list), output
                    # ./output_dir/linprobe (finetune), logs in the output folder, workers fitted to the machine
                    model=None, nb_classes=None, amp="auto", data_root=None,
                    grad_checkpointing=False)
    assert {k: getattr(a, k) for k in expected} == expected
    p = main_linprobe.get_args_parser()
    assert p.parse_args(["--local-rank=3"]).local_rank == 3
    assert p.parse_args(["--local_rank", "2"]).local_rank == 2
    assert p.parse_args(["--global_pool"]).global_pool and not p.parse_args(["--global_pool", "--cls_token"]).global_pool
    assert p.parse_args(["--no_pin_mem"]).pin_mem is False


def test_model_names():
    assert resolve_model_name("vit_large_patch16") == "vit_large_patch16"
    assert resolve_model_name("mae_vit_large_patch16") == "vit_large_patch16"
    assert resolve_model_name("mae_vit_base_patch16_dec512d8b") == "vit_base_patch16"
    with pytest.raises(SystemExit, match="not an encoder"):
        resolve_model_name("resnet50")


def test_resolution_report(capsys):
    p = main_linprobe.get_args_parser()
    info = main_linprobe.report_resolutions(p.parse_args([]))  # original defaults: train ~1.8-2.5 vs eval 1.0
    out = capsys.readouterr().out
    assert info["eval_res"] == 1.0 and 1.7 < info["train_res_min"] < info["train_res_max"] < 2.5
    assert "res: train" in out and "WARNING" in out
    matched = p.parse_args(["--eval_gsd", "--eval_base_resolution", "1.0", "--eval_scale", "112",
                            "--base_resolution", "1.0"])
    info = main_linprobe.report_resolutions(matched)
    assert info["eval_res"] == pytest.approx(2.0)  # 1.0 * 224 / 112
    assert "WARNING" in capsys.readouterr().out  # train median 0.86 vs eval 2.0
    main_linprobe.report_resolutions(p.parse_args(["--base_resolution", "1.0", "--eval_base_resolution", "0.85"]))
    assert "WARNING" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ linear probe
def test_linear_probe_trains_only_the_head(data, tmp_path):
    """Frozen tiny encoder (random MAE init, torch seed 0) + BN + linear head, 3 epochs, seed 0.

    Chance is 25 % (4 balanced classes, 24 val images); the probe must reach >= 75 % (observed ~90-97 %), i.e. at
    least 50 points above chance. The encoder tensors must be bit-identical to the loaded checkpoint.
    """
    out = tmp_path / "probe"
    result = main_linprobe.main(cli(data, out, "--epochs", "3", "--checkpoint_path", str(data["mae_ckpt"])))
    assert result["best_acc1"] >= 75.0, result
    assert len(result["history"]) == 3

    ckpt = latest(out)
    sd = ckpt["model"]
    mae_sd = data["mae_sd"]
    for key in encoder_keys(sd):
        assert torch.equal(sd[key], mae_sd[key]), f"frozen encoder tensor {key} changed"
    assert sorted(k for k in sd if k.startswith("head.")) == [
        "head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var", "head.1.bias", "head.1.weight"]
    assert sd["head.1.bias"].abs().sum() > 0  # starts at zero
    assert sd["head.0.running_mean"].abs().sum() > 0 and int(sd["head.0.num_batches_tracked"]) == 9
    # only the head is in the optimizer: one decayed weight, one undecayed bias
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.05, 1), (0.0, 1)]
    assert ckpt["epoch"] == 2 and ckpt["best_acc1"] == result["best_acc1"]
    assert ckpt["args"]["nb_classes"] == NUM_CLASSES and isinstance(ckpt["args"], dict)

    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2] and {"test_acc1", "test_acc5", "train_loss"} <= set(lines[0])
    assert (out / "config.yaml").is_file() and any(f.startswith("events.out") for f in os.listdir(out))
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == [
        "checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-latest.pth"]


def test_finetune_updates_encoder_with_layer_decay(data, tmp_path):
    out = tmp_path / "ft"
    args = cli(data, out, "--finetune", "--checkpoint_path", str(data["mae_ckpt"]), "--layer_decay", "0.5",
               "--linear_layer_scale", "3.0", "--accum_iter", "3", "--amp", "bf16", "--blr", "1e-3")
    main_linprobe.main(args)
    ckpt = latest(out)
    sd, mae_sd = ckpt["model"], data["mae_sd"]
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], mae_sd["blocks.0.attn.qkv.weight"])
    assert not torch.equal(sd["patch_embed.proj.weight"], mae_sd["patch_embed.proj.weight"])
    assert torch.equal(sd["pos_embed"], mae_sd["pos_embed"])  # the unused table stays frozen

    groups = {g["name"]: g for g in ckpt["optimizer"]["param_groups"]}
    depth = 4
    for layer_id in (0, 1, 3, depth):
        assert groups[f"layer_{layer_id}_no_decay"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - layer_id))
    assert "cls_token" in groups["layer_0_no_decay"]["param_names"]
    assert groups["layer_2_decay"]["param_names"] == [f"blocks.1.{n}.weight" for n in
                                                      ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert groups["layer_5_decay"]["param_names"] == ["head.1.weight"]
    assert groups["layer_5_decay"]["lr_scale"] == pytest.approx(3.0)  # 0.5 ** 0 * linear_layer_scale
    assert groups["layer_5_no_decay"]["lr_scale"] == pytest.approx(1.0)  # norm + head bias: not scaled
    assert "pos_embed" not in sum((g["param_names"] for g in groups.values()), [])
    # 3 steps per epoch, accumulation 3 -> exactly one optimizer step; lr of each group = scheduled lr * lr_scale
    state = ckpt["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {1}
    base = groups["layer_5_no_decay"]["lr"]
    assert groups["layer_0_decay"]["lr"] == pytest.approx(base * 0.5 ** 5)


def test_finetune_param_groups_directly():
    args = main_linprobe.get_args_parser().parse_args(
        ["--model", "vit_tiny_patch16", "--input_size", "64", "--finetune", "--layer_decay", "0.75",
         "--linear_layer_scale", "10", "--eval"])
    model = main_linprobe.build_model(args, 7)
    groups = main_linprobe.build_param_groups(model, args)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** 5)
    assert scale["blocks.0.norm1.weight"] == pytest.approx(0.75 ** 4)
    assert scale["blocks.3.mlp.fc2.weight"] == pytest.approx(0.75 ** 1)
    assert scale["norm.weight"] == pytest.approx(1.0)
    assert scale["head.1.weight"] == pytest.approx(10.0)
    assert "pos_embed" not in scale
    probe_args = main_linprobe.get_args_parser().parse_args(["--model", "vit_tiny_patch16", "--input_size", "64"])
    probe = main_linprobe.build_model(probe_args, 7)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert isinstance(probe.head[0], nn.BatchNorm1d) and not probe.head[0].affine and probe.head[0].eps == 1e-6
    assert 0.007 < probe.head[1].weight.std() < 0.013  # trunc_normal std 0.01 (timm init would be 0.02)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_path_expected_keys(data, capsys):
    args = main_linprobe.get_args_parser().parse_args(["--model", "vit_tiny_patch16", "--input_size", "64"])
    model = main_linprobe.models_vit.MODELS[args.model](img_size=64, num_classes=NUM_CLASSES)
    report = main_linprobe.load_pretrained(model, str(data["mae_ckpt"]))
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"]
    encoder = set(model.state_dict())
    assert set(report.unexpected_keys) == set(data["mae_sd"]) - encoder
    assert all(k.startswith(("decoder", "fpn.", "fcn_", "mask_token")) for k in report.unexpected_keys)
    for key in encoder - {"head.weight", "head.bias"}:
        assert torch.equal(model.state_dict()[key], data["mae_sd"][key])


def test_mismatched_checkpoint_names_shapes(data, tmp_path):
    torch.manual_seed(0)
    other = models_mae.MaskedAutoencoderViT(img_size=64, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=32,
                                            decoder_depth=1, decoder_num_heads=2, fcn_dim=16, fcn_layers=1)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(SystemExit) as err:
        main_linprobe.main(cli(data, tmp_path / "bad", "--checkpoint_path", str(path)))
    message = str(err.value)
    assert "cls_token: checkpoint (1, 1, 96) vs model (1, 1, 192)" in message
    assert not (tmp_path / "bad" / "checkpoint-latest.pth").exists()


def test_eval_only_and_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = main_linprobe.main(cli(data, out, "--checkpoint_path", str(data["mae_ckpt"])))
    assert [h["epoch"] for h in first["history"]] == [0] and latest(out)["epoch"] == 0

    second = main_linprobe.main(cli(data, out, "--epochs", "2", "--checkpoint_path", str(data["mae_ckpt"])))
    printed = capsys.readouterr().out
    assert "autoresume" in printed and "is ignored" not in printed  # same --checkpoint_path as at the start
    assert [h["epoch"] for h in second["history"]] == [1]
    ckpt = latest(out)
    assert ckpt["epoch"] == 1 and ckpt["best_acc1"] == max(first["best_acc1"], second["history"][0]["test_acc1"])
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1]

    stamp = (out / "checkpoint-latest.pth").stat().st_mtime_ns
    stats = main_linprobe.main(cli(data, out, "--eval", "--epochs", "5"))
    printed = capsys.readouterr().out
    assert "Accuracy of the network on the 24 test images" in printed and "Epoch: [" not in printed
    assert stats["n"] == 24 and stats["acc1"] == pytest.approx(second["history"][0]["test_acc1"])
    assert stats["acc5"] == 100.0  # 4 classes: top-5 clips to top-4
    assert (out / "checkpoint-latest.pth").stat().st_mtime_ns == stamp  # nothing trained or saved
    assert len((out / "log.txt").read_text().splitlines()) == 2

    # autoresuming with another (here: missing) --checkpoint_path says that file is not used
    nope = tmp_path / "nope.pth"
    main_linprobe.main(cli(data, out, "--eval", "--checkpoint_path", str(nope)))
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: autoresume")]
    assert len(warning) == 1 and f"--checkpoint_path {nope} (that file does not exist) is ignored" in warning[0]
    assert f"started from {data['mae_ckpt']}" in warning[0]

    # an explicit --resume of a pretraining checkpoint is refused with a pointer to --checkpoint_path
    with pytest.raises(SystemExit, match="--checkpoint_path"):
        main_linprobe.main(cli(data, tmp_path / "x", "--resume", str(data["mae_ckpt"])))


# ------------------------------------------------------------------------------------ rank reduction
def test_shard_sampler_has_no_duplicates():
    ds = list(range(10))
    shards = [list(main_linprobe.ShardSampler(ds, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == ds and [len(s) for s in shards] == [4, 3, 3]


class _Identity(nn.Module):
    def forward(self, x, input_res=None):
        return x


def _fixed_eval_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=g)
    labels = torch.randint(0, 6, (7,), generator=g)
    return list(zip(logits, labels))


def _eval_worker(rank, world, port, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ds = _fixed_eval_set()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=main_linprobe.ShardSampler(ds, world, rank))
    stats = evaluate(loader, _Identity(), torch.device("cpu"), 1.0, print_freq=100)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(stats, f)
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo tcp init")
def test_evaluate_sums_counts_over_ranks(tmp_path):
    """7 samples over 2 ranks (4 + 3, no padding): the reduced accuracy/loss equal the single-process ones."""
    ds = _fixed_eval_set()
    single = evaluate(torch.utils.data.DataLoader(ds, batch_size=3), _Identity(), torch.device("cpu"), 1.0)
    result = tmp_path / "stats.json"
    # fork: no re-import of torch and this module in the children (spawn costs ~10 s on 2 cores)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_eval_worker, args=(2, free_port(), str(result)), nprocs=2, join=True, start_method=method)
    multi = json.loads(result.read_text())
    assert multi["n"] == single["n"] == 7
    for key in ("acc1", "acc5", "loss"):
        assert multi[key] == pytest.approx(single[key], abs=1e-6)
    logits = torch.stack([x for x, _ in ds])
    labels = torch.stack([y for _, y in ds])
    assert single["acc1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())


def test_validation_images_of_different_sizes_are_resized():
    """A validation folder with 48 and 64 px images (the original crashed stacking them) is resized to
    --eval_scale image by image; same-size batches are stacked untouched."""
    collate = main_linprobe.ValCollate(32)
    a, b = torch.rand(3, 48, 48), torch.rand(3, 64, 64)
    imgs, labels = collate([(a, 0), (b, 1)])
    assert imgs.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    torch.testing.assert_close(imgs[1], torch.nn.functional.interpolate(b[None], size=(32, 32), mode="area")[0])
    same, _ = collate([(b, 0), (b, 1)])
    assert same.shape == (2, 3, 64, 64) and torch.equal(same[0], b)
