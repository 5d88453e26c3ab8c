"""The original README's commands, as a user types them, in a fresh copy of the repository.

Setup as the original README says: a fake fMoW-rgb tree (``train/<category>/<category>_<n>/..._rgb.jpg`` and a
RESISC-style folder with the shipped list names) symlinked into the copy as ``data`` (``ln -s ~/data/fmow-rgb
data``). Each command runs through ``python -m torch.distributed.launch --nproc_per_node=2`` (gloo, CPU) with only
what a CPU forces added: ``--device cpu`` and a tiny model/size/schedule. One module-scoped copy; the commands run
in README order and share its outputs.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("airport", "farm", "port")
RESISC_CLASSES = ("beach", "forest", "river")
# what a CPU forces: no GPU, and a model/schedule small enough for a test
CPU = ["--device", "cpu"]
PRETRAIN_CPU = CPU + ["--model", "mae_vit_tiny_patch16", "--input_size", "64", "--epochs", "1", "--batch_size", "4"]
PROBE_CPU = CPU + ["--input_size", "64", "--eval_scale", "64", "--epochs", "1", "--batch_size", "4"]
LAUNCH = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2"]


def _jpg(path: Path, rng: np.random.Generator, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def make_fake_fmow(root: Path) -> None:
    """fMoW-rgb layout: train/<cat>/<cat>_<n>/<cat>_<n>_<k>_rgb.jpg (+ a _rgb.json that must be ignored);
    resisc45/<class>/<class>_<i>.jpg with train-resisc.txt / val-resisc.txt lists (``./<class>/<file>``)."""
    rng = np.random.default_rng(0)
    for cat in CATEGORIES:
        for n in range(2):
            for k in range(2):
                stem = root / "train" / cat / f"{cat}_{n}" / f"{cat}_{n}_{k}_rgb"
                _jpg(stem.with_suffix(".jpg"), rng, 96)
                stem.with_suffix(".json").write_text("{}")
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for cls in RESISC_CLASSES:
        for i in range(6):
            _jpg(root / "resisc45" / cls / f"{cls}_{i}.jpg", rng, 48 if i % 2 else 64)  # mixed sizes
            lists["train" if i < 4 else "val"].append(f"./{cls}/{cls}_{i}.jpg")
    for split, lines in lists.items():
        (root / "resisc45" / f"{split}-resisc.txt").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the repository (what a fresh clone has) with ``data -> fmow-rgb``."""
    base = tmp_path_factory.mktemp("readme")
    repo = base / "scale-mae"
    repo.mkdir()
    for item in REPO.iterdir():
        if item.suffix == ".py" and item.is_file():
            shutil.copy2(item, repo / item.name)
    for folder in ("harness", "evaluation", "inference", "util", "dataloaders", "config", "tools", "layers"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    make_fake_fmow(base / "fmow-rgb")
    os.symlink(base / "fmow-rgb", repo / "data")  # ln -s ~/data/fmow-rgb data
    return repo


def run(cmd: list[str], cwd: Path, expect: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCH_HOME=str(cwd / ".torch"))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"{' '.join(cmd)} -> {proc.returncode}\n{out[-4000:]}"
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readme_commands_in_order(clone):
    # --- Pretraining: `python -m torch.distributed.launch --nproc_per_node=4 main_pretrain.py`
    out = run(LAUNCH + ["main_pretrain.py", *PRETRAIN_CPU], clone)
    assert "using config/fmow.yaml" in out
    assert out.count("kNN monitor off") == 1  # one warning line, rank 0 only, and the run goes on
    ckpt = torch.load(clone / "output_dir" / "checkpoint-latest.pth", weights_only=True)
    assert ckpt["writer"] == "main_pretrain" and ckpt["epoch"] == 0 and ckpt["args"]["world_size"] == 2
    assert ckpt["args"]["config"].endswith("config/fmow.yaml") and (clone / "output_dir" / "config.yaml").is_file()
    assert list((clone / "output_dir").glob("events.out.tfevents*"))  # --log_dir defaults to --output_dir
    pretrained = clone / "output_dir" / "checkpoint-latest.pth"
    before = digest(pretrained)

    # --- kNN with split lists (the README's command; no --model: the checkpoint's architecture is used)
    out = run(LAUNCH + ["main_pretrain.py", "--resume", str(pretrained), "--eval_only", "--eval_dataset", "resisc",
                        "--eval_train_fnames", "data/resisc45/train-resisc.txt",
                        "--eval_val_fnames", "data/resisc45/val-resisc.txt", *CPU], clone)
    assert "the checkpoint is mae_vit_tiny_patch16" in out and "bank 12, queries 6" in out
    assert "eval results (224)" in out and "effective batch" not in out  # no training lines in a kNN-only run
    # --- kNN with --eval_path (an ImageFolder split 90/10)
    out = run(LAUNCH + ["main_pretrain.py", "--resume", str(pretrained), "--eval_only", "--eval_dataset", "resisc",
                        "--eval_path", "data/resisc45", *CPU], clone)
    assert "bank 16, queries 2" in out
    assert digest(pretrained) == before

    # --- Linear probe: `main_linprobe.py --checkpoint_path <ckpt>`
    out = run(LAUNCH + ["main_linprobe.py", "--checkpoint_path", str(pretrained), *PROBE_CPU], clone)
    assert "autoresume" not in out and "vit_tiny_patch16, from" in out
    assert "validation: " in out and "val-resisc.txt" in out
    assert "Accuracy of the network on the 6 test images" in out  # the val list, never the training images
    probe = torch.load(clone / "output_dir" / "linprobe" / "checkpoint-latest.pth", weights_only=True)
    assert probe["writer"] == "main_linprobe" and "head.1.weight" in probe["model"]
    assert list((clone / "output_dir" / "linprobe").glob("events.out.tfevents*"))

    # --- Finetuning: `--finetune`, here with the original's whole-folder --eval_path (it holds the training
    # images: they are left out, so validation is the 6 others)
    out = run(LAUNCH + ["main_linprobe.py", "--checkpoint_path", str(pretrained), "--finetune",
                        "--eval_path", "data/resisc45", *PROBE_CPU], clone)
    assert "12 of the 18 images" in out and "Accuracy of the network on the 6 test images" in out
    assert "autoresume" not in out
    assert torch.load(clone / "output_dir" / "finetune" / "checkpoint-latest.pth", weights_only=True)["writer"] \
        == "main_linprobe"
    assert digest(pretrained) == before


def test_probe_validation_never_holds_training_images(tmp_path):
    """Whatever the sources, build_linprobe_datasets returns disjoint train/val file sets: a val folder that holds
    the training images (the original's default), a list next to the train list, and no val source (seeded split,
    the same for the same seed)."""
    from dataloaders.builders import build_linprobe_datasets

    make_fake_fmow(tmp_path)
    root = tmp_path / "resisc45"
    cfg = {"data": {"type": "resisc", "img_dir": str(root / "train-resisc.txt"), "mean": [0.4] * 3,
                    "std": [0.2] * 3}}

    def files(ds):
        return {os.path.realpath(p) for p, _ in ds.samples}

    cases = {"folder": str(root), "list next to train": None}
    for name, eval_path in cases.items():
        notes: list[str] = []
        train, val, n = build_linprobe_datasets(cfg, "resisc", eval_path, input_size=32, eval_scale=32, report=notes)
        assert files(train).isdisjoint(files(val)) and len(val) == 6 and len(train) == 12 and n == 3, (name, notes)
    # no validation source at all: a seeded per-class split of the training list, said in the report
    (root / "val-resisc.txt").unlink()
    notes = []
    train, val, _ = build_linprobe_datasets(cfg, "resisc", None, input_size=32, eval_scale=32, report=notes, seed=3)
    assert files(train).isdisjoint(files(val)) and len(train) + len(val) == 12 and len(val) == 3
    assert any("seeded split (seed 3)" in line for line in notes)
    again, val_again, _ = build_linprobe_datasets(cfg, "resisc", None, input_size=32, eval_scale=32, seed=3)
    assert files(val_again) == files(val)
    assert re.search(r"holds out 3 of 12", " ".join(notes))


def test_flag_reference_is_generated_and_lists_every_flag():
    """docs/flags.md (linked from the README) is exactly what ``tools/flag_reference.py --write`` generates from the
    parsers, it covers every flag of the three launchers, and -h states no default twice (no argparse
    '(default: ...)' suffix on top of ours)."""
    import main_linprobe
    import main_pretrain
    import main_segment
    import importlib.util

    spec = importlib.util.spec_from_file_location("flag_reference", REPO / "tools" / "flag_reference.py")
    flag_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_reference)
    reference = (REPO / "docs" / "flags.md").read_text()
    assert reference == flag_reference.render(), "docs/flags.md is stale: run python tools/flag_reference.py --write"
    assert "](docs/flags.md)" in (REPO / "README.md").read_text()
    for module in (main_pretrain, main_linprobe, main_segment):
        parser = module.get_args_parser()
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in reference, (module.__name__, flag)
        text = parser.format_help()
        assert "default: True" not in text and "default: False" not in text
        for action in parser._actions:
            assert (action.help or "").count("(default") <= 1, action.option_strings
