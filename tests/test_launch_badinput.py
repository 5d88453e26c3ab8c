"""Bad input and faults at the launchers and the export tool: a census of realistic mistakes, NaN runs, malicious
checkpoints, and the start-up behaviour around them.

Every census case runs the command line in-process through ``harness.run`` (what ``python main_*.py`` does) and
must: exit non-zero, print exactly one ``error:`` line that names the culprit, print no traceback, and leave every
file that existed before byte-identical.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_linprobe
import main_pretrain
import models_mae
import models_vit
import harness
from util.amp import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("export_encoder", REPO / "tools" / "export_encoder.py")
export_encoder = sys.modules.setdefault("export_encoder", importlib.util.module_from_spec(_spec))
if not hasattr(export_encoder, "run"):
    _spec.loader.exec_module(export_encoder)
DEMO = str(REPO / "config" / "demo.yaml")
LAUNCHERS = {"pretrain": main_pretrain, "linprobe": main_linprobe, "export": export_encoder}


# ------------------------------------------------------------------------------------------------ fixtures
class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """name -> (object whose unpickling would create ``marker``, the global the error must name)."""
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), "os.system"),
        "exec": (Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "subprocess.Popen": (Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files a user has lying around: data, a finished pretraining run, a probe run, good/bad checkpoints."""
    from dataloaders.synthetic import make_scene_folder

    root = tmp_path_factory.mktemp("census")
    make_scene_folder(root / "scenes" / "train", 2, per_class=4, size=64, seed=0)
    make_scene_folder(root / "scenes" / "val", 2, per_class=2, size=64, seed=1)
    (root / "probe.yaml").write_text("data:\n  type: resisc\n  img_dir: scenes/train\n  mean: [0.4, 0.4, 0.4]\n"
                                     "  std: [0.2, 0.2, 0.2]\n")
    (root / "unknown_key.yaml").write_text("data:\n  type: demo\n  colour: red\n")
    (root / "fmow_missing.yaml").write_text("data:\n  type: fmow\n  img_dir: nowhere/train\n  mean: [0.4, 0.4, 0.4]\n"
                                            "  std: [0.2, 0.2, 0.2]\n")
    (root / "list.txt").write_text("./class_00/img_0000.png\n./class_00/missing.png\n")
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32)
    torch.save({"model": mae.state_dict(), "args": {"model": "mae_vit_tiny_patch16"}}, root / "mae_tiny.pth")
    torch.save({"model": models_mae.MaskedAutoencoderViT(embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32,
                                                         img_size=32).state_dict()}, root / "other_arch.pth")
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, root / "not_a_vit.pth")
    (root / "truncated.pth").write_bytes((root / "mae_tiny.pth").read_bytes()[:5000])
    (root / "a_file").write_text("not a folder")
    pay = payloads(root / "PWNED")
    torch.save({"model": mae.state_dict(), "x": pay["os.system"][0]}, root / "evil_system.pth")
    torch.save({"model": {}, "x": pay["exec"][0]}, root / "evil_exec.pth", _use_new_zipfile_serialization=False)
    torch.save({"model": {}, "x": pay["subprocess.Popen"][0]}, root / "evil_popen.pth")
    # a finished pretraining run and a probe run, written by the launchers' own keeper
    for name, writer, model in (("pre_run", "main_pretrain", mae),
                                ("probe_run", "main_linprobe", models_vit.vit_tiny_patch16(num_classes=2))):
        keeper = harness.CheckpointKeeper(root / name, writer)
        keeper.save({"model": model.state_dict(), "epoch": 0, "args": {"epochs": 1}}, "the end of epoch 0")
        (root / name / "config.yaml").write_text("args: {}\n")
        (root / name / "log.txt").write_text('{"epoch": 0}\n')
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


PRE = ["--device", "cpu", "--num_workers", "0", "--model", "mae_vit_tiny_patch16", "--input_size", "32",
       "--epochs", "1", "--batch_size", "4", "--warmup_epochs", "0", "--skip_knn_eval"]
PRE_RUN = PRE + ["--config", DEMO, "--output_dir", "{root}/pre_fresh"]
PROBE = ["--device", "cpu", "--num_workers", "0", "--input_size", "64", "--eval_scale", "64", "--epochs", "1",
         "--batch_size", "4", "--config", "{root}/probe.yaml", "--output_dir", "{root}/probe_fresh"]
PROBE_W = PROBE + ["--checkpoint_path", "{root}/mae_tiny.pth"]
KNN = ["--device", "cpu", "--num_workers", "0", "--eval_only", "--output_dir", "{root}/knn_out"]

# (launcher, argv, text the single error line must contain)
CENSUS = [
    ("pretrain", PRE_RUN + ["--mask_ratio", "1.5"], "--mask_ratio 1.5"),
    ("pretrain", PRE_RUN + ["--mask_ratio", "-0.1"], "--mask_ratio -0.1"),
    ("pretrain", PRE_RUN + ["--epochs", "0"], "--epochs 0"),
    ("pretrain", PRE_RUN + ["--batch_size", "0"], "--batch_size 0"),
    ("pretrain", PRE_RUN + ["--input_size", "40"], "--input_size 40"),
    ("pretrain", PRE_RUN + ["--target_size", "100"], "--target_size 100"),
    ("pretrain", PRE_RUN + ["--source_size", "24"], "--source_size 24"),
    ("pretrain", PRE_RUN + ["--scale_min", "0"], "--scale_min 0"),
    ("pretrain", PRE_RUN + ["--blr", "-1"], "--blr -1"),
    ("pretrain", PRE_RUN + ["--knn", "0"], "--knn 0"),
    ("pretrain", PRE_RUN + ["--model", "mae_vit_gigantic"], "mae_vit_gigantic"),
    ("pretrain", PRE_RUN + ["--no_mask_token"], "--no_mask_token"),
    ("pretrain", PRE_RUN + ["--device", "tpu:x"], "--device"),
    ("pretrain", PRE_RUN + ["--config", "{root}/nope.yaml"], "nope.yaml"),
    ("pretrain", PRE_RUN + ["--config", "{root}/unknown_key.yaml"], "colour"),
    ("pretrain", PRE_RUN + ["--config", "{root}/fmow_missing.yaml"], "nowhere/train"),
    ("pretrain", PRE_RUN + ["--batch_size", "1000"], "--batch_size"),
    ("pretrain", PRE_RUN + ["--resume", "{root}/nope.pth"], "nope.pth"),
    ("pretrain", PRE_RUN + ["--resume", "{root}/truncated.pth"], "truncated.pth"),
    ("pretrain", PRE_RUN + ["--resume", "{root}/other_arch.pth"], "cls_token: checkpoint (1, 1, 64)"),
    ("pretrain", PRE_RUN + ["--skip_knn_eval", "--output_dir", "{root}/a_file"], "--output_dir"),
    ("pretrain", PRE_RUN + ["--output_dir", "{root}/probe_run"], "written by main_linprobe.py"),
    ("pretrain", [a for a in PRE_RUN if a != "--skip_knn_eval"] + ["--eval_path", "{root}/nowhere"], "nowhere"),
    ("pretrain", KNN, "--eval_only needs weights"),
    ("pretrain", KNN + ["--resume", "{root}/mae_tiny.pth"], "--eval_train_fnames"),
    ("pretrain", KNN + ["--resume", "{root}/mae_tiny.pth", "--eval_train_fnames", "{root}/list.txt"],
     "--eval_val_fnames"),
    ("pretrain", KNN + ["--resume", "{root}/mae_tiny.pth", "--eval_train_fnames", "{root}/list.txt",
                        "--eval_val_fnames", "{root}/list.txt"], "missing.png"),
    ("pretrain", KNN + ["--resume", "{root}/mae_tiny.pth", "--eval_dataset", "imagenet9",
                        "--eval_path", "{root}/scenes/train"], "imagenet9"),
    ("pretrain", KNN + ["--resume", "{root}/mae_tiny.pth", "--model", "mae_vit_base_patch16", "--eval_dataset",
                        "demo"], "cls_token: checkpoint (1, 1, 192) vs model (1, 1, 768)"),
    ("linprobe", PROBE, "--checkpoint_path"),
    ("linprobe", PROBE + ["--checkpoint_path", "{root}/nope.pth"], "nope.pth"),
    ("linprobe", PROBE + ["--checkpoint_path", "{root}/not_a_vit.pth"], "patch_embed"),
    ("linprobe", PROBE + ["--checkpoint_path", "{root}/truncated.pth"], "truncated.pth"),
    ("linprobe", PROBE + ["--resume", "{root}/mae_tiny.pth"], "--checkpoint_path"),
    ("linprobe", PROBE_W + ["--output_dir", "{root}/pre_run"], "written by main_pretrain.py"),
    ("linprobe", PROBE_W + ["--nb_classes", "1"], "--nb_classes 1"),
    ("linprobe", PROBE_W + ["--eval_path", "{root}/no_val"], "no_val"),
    ("linprobe", PROBE_W + ["--config", "{root}/nope.yaml"], "nope.yaml"),
    ("linprobe", PROBE_W + ["--input_size", "50"], "--input_size 50"),
    ("linprobe", PROBE_W + ["--model", "resnet50"], "resnet50"),
    ("linprobe", PROBE_W + ["--scale_max", "1.5"], "--scale_max 1.5"),
    ("linprobe", PROBE_W + ["--epochs", "-3"], "--epochs -3"),
    ("linprobe", PROBE_W + ["--batch_size", "100"], "--batch_size"),
    ("linprobe", PROBE_W + ["--eval_dataset", "imagenet9"], "imagenet9"),
    ("export", ["{root}/nope.pth", "--output", "{root}/exp/a"], "nope.pth"),
    ("export", ["{root}/not_a_vit.pth", "--output", "{root}/exp/b"], "patch_embed"),
    ("export", ["{root}/mae_tiny.pth", "--output", "{root}/mae_tiny"], "would overwrite"),
    ("export", ["{root}/mae_tiny.pth", "--output", "{root}/exp/c", "--res", "0"], "--res 0"),
    ("export", ["{root}/truncated.pth", "--output", "{root}/exp/d"], "truncated.pth"),
]


def run_cli(launcher: str, argv: list[str], root: Path, capsys) -> tuple[int, str, str]:
    module = LAUNCHERS[launcher]
    entry = module.run if launcher == "export" else module.main
    argv = [a.replace("{root}", str(root)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        harness.run(entry, module.get_args_parser(), argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.mark.parametrize("launcher,argv,culprit", CENSUS, ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CENSUS)])
def test_bad_input_census(world, launcher, argv, culprit, capsys):
    before = snapshot(world)
    code, out, err = run_cli(launcher, argv, world, capsys)
    assert code not in (0, None)
    lines = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out + err
    assert culprit in lines[0], lines[0]
    assert err.strip() == lines[0], err  # nothing else on stderr: no traceback
    assert "Traceback" not in out + err and "weights_only=False" not in out + err
    after = snapshot(world)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing pre-existing changed
    assert not [k for k in after if k not in before and "checkpoint" in k], "a checkpoint was written"


def test_census_size():
    launchers = {c[0] for c in CENSUS}
    assert len(CENSUS) >= 30 and launchers == {"pretrain", "linprobe", "export"}


def test_debug_shows_the_traceback(world, capsys, monkeypatch):
    """--debug (or SCALEMAE_DEBUG=1) adds the traceback before the same error line and exit status."""
    argv = [a.replace("{root}", str(world)) for a in PRE_RUN] + ["--mask_ratio", "2"]
    for extra, env in (([], "1"), (["--debug"], "")):
        monkeypatch.setenv(harness.DEBUG_ENV, env)
        with pytest.raises(SystemExit) as exc:
            harness.run(main_pretrain.main, main_pretrain.get_args_parser(), argv + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback (most recent call last)" in err and "validate_args" in err
        assert err.strip().splitlines()[-1].startswith("error: --mask_ratio 2")
    monkeypatch.setenv(harness.DEBUG_ENV, "1")
    with pytest.raises(SystemExit):
        harness.run(export_encoder.run, export_encoder.get_args_parser(), [str(world / "nope.pth"), "-o", "x"])
    assert "FileNotFoundError" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- malicious checkpoints
@pytest.mark.parametrize("kind", ["os.system", "exec", "subprocess.Popen"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_checkpoint_refused_at_every_load_point(tmp_path, capsys, kind, zip_format):
    marker = tmp_path / "PWNED"
    payload, name = payloads(marker)[kind]
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": {"model": "mae_vit_tiny_patch16"}, "x": payload}, evil,
               _use_new_zipfile_serialization=zip_format)
    auto_pre, auto_probe = tmp_path / "auto_pre", tmp_path / "auto_probe"
    for folder in (auto_pre, auto_probe):
        folder.mkdir()
        (folder / "checkpoint-latest.pth").write_bytes(evil.read_bytes())
    base = ["--device", "cpu", "--num_workers", "0"]
    points = {
        "pretrain --resume": ("pretrain", base + ["--resume", str(evil), "--config", DEMO,
                                                  "--output_dir", str(tmp_path / "o1")]),
        "pretrain autoresume": ("pretrain", base + ["--config", DEMO, "--output_dir", str(auto_pre)]),
        "pretrain --eval_only": ("pretrain", base + ["--resume", str(evil), "--eval_only", "--eval_dataset", "demo",
                                                     "--output_dir", str(tmp_path / "o2")]),
        "linprobe --checkpoint_path": ("linprobe", base + ["--checkpoint_path", str(evil),
                                                           "--output_dir", str(tmp_path / "o3")]),
        "linprobe --resume": ("linprobe", base + ["--resume", str(evil), "--output_dir", str(tmp_path / "o4")]),
        "linprobe autoresume": ("linprobe", base + ["--checkpoint_path", str(evil), "--output_dir", str(auto_probe)]),
        "export": ("export", [str(evil), "--output", str(tmp_path / "exp" / "e")]),
    }
    for point, (launcher, argv) in points.items():
        code, out, err = run_cli(launcher, argv, tmp_path, capsys)
        assert code == 2, point
        assert err.count("\n") == 1 and err.startswith("error:"), (point, err)
        assert name in err and str(tmp_path) in err, (point, err)  # the global and the file
        assert "evil.pth" in err or "checkpoint-latest.pth" in err, (point, err)
        assert "weights_only=False" not in err and "Traceback" not in err, err
    for load in (lambda: models_vit.load_mae_checkpoint(models_vit.vit_tiny_patch16(), str(evil)),
                 lambda: export_encoder.import_encoder(evil)):
        with pytest.raises(Exception, match=name.replace(".", r"\.")):
            load()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- NaN and restarts
def demo_argv(out: Path, *extra: str) -> list[str]:
    return ["--config", DEMO, "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "8",
            "--epochs", "2", "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0", "--output_dir", str(out),
            "--skip_knn_eval", "--print_freq", "100", "--data_override", "data.length=32", *extra]


def test_nan_run_keeps_a_verified_checkpoint_that_trains_on(tmp_path, capsys):
    """--blr 1e9 explodes after a few steps; with --save_every_steps 1 the state that gave the NaN (and any
    exploded one) is not left as checkpoint-latest.pth: it holds the last state whose loss was finite, the
    message says which, and resuming it with a sane --blr trains on with finite losses."""
    out = tmp_path / "run"
    parser = main_pretrain.get_args_parser()
    with pytest.raises(SystemExit) as exc:
        harness.run(main_pretrain.main, parser, demo_argv(out, "--blr", "1e9", "--save_every_steps", "1"))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loss is nan" in err and "the last state whose loss was finite" in err, err
    ckpt = torch.load(out / "checkpoint-latest.pth", weights_only=True)
    assert ckpt["state_label"] in err and ckpt["writer"] == "main_pretrain"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not list(out.glob(".checkpoint-*.tmp"))
    # resume with a sane learning rate: finite losses, lr on the new schedule
    result = harness.run(main_pretrain.main, parser, demo_argv(out, "--blr", "1e-4"))
    history = result["history"]
    assert history and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    assert max(h["train_lr"] for h in history) <= 1e-4 * 8 / 256 + 1e-12
    final = torch.load(out / "checkpoint-latest.pth", weights_only=True)
    assert final["epoch"] == 1 and all(torch.isfinite(v).all() for v in final["model"].values()
                                       if v.is_floating_point())


def test_restart_behaviour_stale_temp_config_history_nothing_left(tmp_path, capsys):
    """A stale temp file of a killed save is removed at start; config.yaml is written when training starts, with
    one history file per start; a finished run rerun says there is nothing left to do and writes nothing."""
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint-latest.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    parser = main_pretrain.get_args_parser()
    harness.run(main_pretrain.main, parser, demo_argv(out, "--epochs", "1", "--warmup_epochs", "0"))
    assert not stale.exists()
    assert len(list((out / "configs").glob("config-*.yaml"))) == 1
    config = (out / "config.yaml").read_bytes()
    # a failing restart (after autoresume, before training) leaves config.yaml as it was
    with pytest.raises(SystemExit):
        harness.run(main_pretrain.main, parser, demo_argv(out, "--epochs", "3", "--batch_size", "1000"))
    assert (out / "config.yaml").read_bytes() == config
    capsys.readouterr()
    before = snapshot(out)
    harness.run(main_pretrain.main, parser, demo_argv(out, "--epochs", "1", "--warmup_epochs", "0"))
    printed = capsys.readouterr().out
    assert "nothing left to do" in printed and "effective batch" not in printed
    assert snapshot(out) == before
    harness.run(main_pretrain.main, parser, demo_argv(out, "--epochs", "2", "--warmup_epochs", "0"))
    assert len(list((out / "configs").glob("config-*.yaml"))) == 2
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_warmup_longer_than_the_run_is_warned(tmp_path, capsys):
    args = main_pretrain.get_args_parser().parse_args(demo_argv(tmp_path / "w", "--warmup_epochs", "20"))
    main_pretrain.validate_args(args)
    assert "--warmup_epochs 20 >= --epochs 2" in capsys.readouterr().out


def test_eval_only_random_init_needs_the_flag(tmp_path, capsys):
    argv = ["--eval_only", "--eval_dataset", "demo", "--model", "mae_vit_tiny_patch16", "--device", "cpu",
            "--num_workers", "0", "--eval_scale", "32", "--output_dir", str(tmp_path / "k")]
    result = harness.run(main_pretrain.main, main_pretrain.get_args_parser(), argv + ["--allow_random_init"])
    printed = capsys.readouterr().out
    assert "randomly initialised" in printed and 32 in result["scales"]
    assert "lr " not in printed.replace("--blr/--lr", "") and "effective batch" not in printed


def test_checkpoint_keeper_contract(tmp_path):
    """The keeper a third launcher uses: saves are stamped with the writer; a state becomes the fallback only once
    verified; reject() restores the last verified file and removes epoch files of the bad state; non-finite
    weights are never written."""
    args = type("A", (), {"checkpoint_interval": 1, "epochs": 9})()
    keeper = harness.CheckpointKeeper(tmp_path, "main_segment")
    latest = tmp_path / "checkpoint-latest.pth"
    keeper.save({"model": {"w": torch.ones(2)}}, "state A", epoch=0, args=args)
    keeper.verify()  # a finite loss came from state A
    keeper.save({"model": {"w": torch.full((2,), 1e30)}}, "state B", epoch=1, args=args)
    assert torch.load(latest, weights_only=True)["state_label"] == "state B"
    note = keeper.reject()  # state B gave a NaN
    restored = torch.load(latest, weights_only=True)
    assert restored["state_label"] == "state A" and restored["writer"] == "main_segment"
    assert "state A" in note and "state B" in note
    assert (tmp_path / "checkpoint-0.pth").is_file() and not (tmp_path / "checkpoint-1.pth").exists()
    assert harness.checkpoint_writer(restored) == "main_segment"
    with pytest.raises(NonFiniteLossError, match="state C"):
        keeper.save({"model": {"w": torch.tensor([float("nan")])}}, "state C")
    assert torch.load(latest, weights_only=True)["state_label"] == "state A"
    assert not list(tmp_path.glob(".checkpoint-*.tmp"))


KEEPER_DDP_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
import harness
from util import dist as dist_util

dist.init_process_group("gloo")
rank = dist.get_rank()
dist_util.setup_for_distributed(rank == 0, rank)
keeper = harness.CheckpointKeeper(sys.argv[1], "main_segment")
model = torch.nn.Linear(2, 2)
with harness.training_run(None, keeper):
    keeper.save({"model": model.state_dict()}, "epoch 0")
    dist.all_reduce(torch.ones(1))  # a training step: its loss is finite on every rank
    keeper.verify()
    if rank == 0:  # the rare case: only rank 0's copy of the weights went non-finite
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    keeper.save({"model": model.state_dict()}, "epoch 1")
    dist.all_reduce(torch.ones(1))  # the next collective, where a rank left behind would fail
    keeper.verify()
print("finished normally")
'''


def test_checkpoint_keeper_non_finite_on_rank0_only_stops_all_ranks_cleanly(tmp_path):
    """Two gloo processes; rank 0 alone holds a NaN weight at a save: the finiteness decision is collective, so
    both ranks stop at the save, the error is one line (rank 0), no rank shows a traceback, both exit non-zero
    and checkpoint-latest.pth still holds the verified state. (Plain processes with the torchrun environment, so
    each rank's output is seen on its own and no launcher traceback is mixed in.)"""
    import socket

    script = tmp_path / "keeper_ddp.py"
    script.write_text(KEEPER_DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    env.pop(harness.DEBUG_ENV, None)
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(REPO)], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outputs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append((proc.returncode, stdout + stderr))
    everything = "\n".join(f"--- rank {r} (exit {rc})\n{text}" for r, (rc, text) in enumerate(outputs))
    assert all(rc != 0 for rc, _ in outputs), everything
    errors = [line for _, text in outputs for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and outputs[0][1].strip() == errors[0], everything  # rank 0: that one line only
    assert "non-finite at epoch 1 on 1 of 2 ranks" in errors[0] and "holds epoch 0" in errors[0], everything
    assert outputs[1][1].strip() == "", everything  # rank 1 stops as quietly (no traceback, no gloo error)
    saved = torch.load(out / "checkpoint-latest.pth", weights_only=True)
    assert saved["state_label"] == "epoch 0" and harness.state_is_finite(saved["model"])
    assert not list(out.glob(".checkpoint-*.tmp"))
