"""main_eval.py suites: parsing and errors, equality with main_pretrain --eval_only, cache, resume, probe, 2 ranks."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main_eval
import main_pretrain
import models_mae
from evaluation import features as feats

REPO = Path(__file__).resolve().parents[1]
SIZES = [16, 32, 48]
CLASSES = ("farm", "forest", "river", "road")


# ------------------------------------------------------------------------------------------------ fixtures
def _images(folder: Path, per_class: int, seed: int, side: int = 32) -> list[str]:
    """Class folders of small PNGs whose colour depends a little on the class (plus much noise: accuracies far from
    100 %, so that cells differ); returns the ``./class/file`` lines."""
    rng = np.random.default_rng(seed)
    lines = []
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([120 + 6 * c, 130 - 4 * c, 110 + 5 * (c % 2)], dtype=np.float64)
            img = np.clip(base + rng.normal(0, 60, (side, side, 3)), 0, 255).astype(np.uint8)
            fname = f"{name}_{seed}_{i}.png"
            Image.fromarray(img).save(folder / name / fname)
            lines.append(f"./{name}/{fname}")
    return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Data root with two datasets in the shipped layouts (split lists; one folder split 90/10) and two tiny
    checkpoints (one a run folder)."""
    base = tmp_path_factory.mktemp("eval")
    data = base / "data"
    resisc = data / "resisc45"
    train = _images(resisc, 4, seed=1)
    val = _images(resisc, 2, seed=2)
    (resisc / "train.txt").write_text("\n".join(train) + "\n")
    (resisc / "val.txt").write_text("\n".join(val) + "\n")
    _images(data / "eurosat", 8, seed=3)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = models_mae.mae_vit_tiny_patch16(img_size=32)
        folder = base / f"run{seed}"
        folder.mkdir()
        path = folder / ("checkpoint-latest.pth" if seed else "weights.pth")
        torch.save({"model": model.state_dict(), "args": {"model": "mae_vit_tiny_patch16"}}, path)
        ckpts.append(path)
    return {"base": base, "data": data, "ckpts": ckpts}


def write_suite(path: Path, world: dict, **changes) -> Path:
    suite = {
        "suite": "tiny",
        "protocol": "knn",
        "model": "mae_vit_tiny_patch16",
        "checkpoints": [{"path": str(world["ckpts"][0]), "name": "a"}, str(world["ckpts"][1].parent)],
        "recipe": {"k": [3, 5], "batch_size": 8},
        "datasets": {
            "resisc": {"root": "resisc45", "train": "train.txt", "val": "val.txt", "native_size": 32,
                       "sizes": SIZES, "reference": 50.0, "reference_sizes": [16, 32]},
            "eurosat": {"root": "eurosat", "split_seed": 0, "native_size": 32, "sizes": SIZES},
        },
    }
    for key, value in changes.items():
        target = suite
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    path.write_text(yaml.safe_dump(suite))
    return path


def run_eval(argv: list[str]) -> dict:
    return main_eval.main(main_eval.get_args_parser().parse_args(argv + ["--device", "cpu", "--num_workers", "0"]))


def error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        import harness

        harness.run(main_eval.main, main_eval.get_args_parser(), argv + ["--device", "cpu", "--num_workers", "0"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ parsing
def test_shipped_suites_parse():
    from evaluation.suite import load_suite

    knn = load_suite(REPO / "config" / "eval" / "paper_knn.yaml", Path("/nonexistent"))
    assert knn.protocol == "knn" and len(knn.datasets) == 8
    natives = {d.name: d.native_size for d in knn.datasets}
    assert natives["eurosat"] == 64 and natives["airound"] == 496 and natives["resisc"] == 256
    assert all(d.reference is not None for d in knn.datasets)
    assert [r.size for r in next(d for d in knn.datasets if d.name == "airound").recipes] == [16, 32, 64, 128, 256, 496]
    probe = load_suite(REPO / "config" / "eval" / "frozen_probe.yaml", Path("/nonexistent"))
    assert probe.protocol == "probe" and probe.probe["knn_k"] == 5
    assert len(probe.datasets[0].sweep_recipes()) > 1


@pytest.mark.parametrize("change, expected", [
    ({"datasets.resisc.sizez": [16]}, r"unknown key datasets.resisc.sizez \(did you mean 'sizes'\?\)"),
    ({"recipe.pooling": "max"}, r"recipe.pooling 'max'"),
    ({"datasets.resisc.sizes": [16, 32, 24]}, r"size 24 px is not a multiple of the patch 16 .* use 16 or 32"),
    ({"model": "mae_vit_base_patch16"}, r"checkpoint a \(.*\) is mae_vit_tiny_patch16, but the suite's model is "
                                        r"mae_vit_base_patch16"),
    ({"datasets.resisc.val": None}, r"give both train and val"),
    ({"checkpoint": "x.pth"}, r"unknown key <top level>.checkpoint \(did you mean 'checkpoints'\?\)"),
    ({"probe": {"C": [0.0, 1.0]}}, r"probe.C must be positive numbers"),
])
def test_bad_suites_are_one_line_before_any_work(world, tmp_path, capsys, change, expected):
    suite = write_suite(tmp_path / "s.yaml", world, **change)
    out = tmp_path / "out"
    line = error_line(["--suite", str(suite), "--data_root", str(world["data"]), "--output_dir", str(out)], capsys)
    assert line.startswith("error: ") and re.search(expected, line), line
    assert not out.exists()  # nothing written


def test_missing_root_skips_that_dataset_unless_strict(world, tmp_path, capsys):
    suite = write_suite(tmp_path / "s.yaml", world, **{"datasets.resisc.root": "nowhere",
                                                        "datasets.eurosat.sizes": [16],
                                                        "checkpoints": [str(world["ckpts"][0])]})
    out = run_eval(["--suite", str(suite), "--data_root", str(world["data"]), "--output_dir", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    assert sum("nowhere not found" in line for line in printed.splitlines()) == 1
    assert {r["dataset"] for r in out["rows"]} == {"eurosat"}
    line = error_line(["--suite", str(suite), "--data_root", str(world["data"]), "--output_dir", str(tmp_path / "p"),
                       "--strict"], capsys)
    assert "datasets.resisc: root" in line and "nowhere not found" in line
    line = error_line(["--suite", str(suite), "--data_root", str(tmp_path / "empty"), "--output_dir",
                       str(tmp_path / "q")], capsys)
    assert "none of its dataset roots exists" in line


# ------------------------------------------------------------------------------------- faithful, cached, resumed
def test_every_cell_equals_main_pretrain_eval_only_then_cache_and_recipe_change(world, tmp_path, monkeypatch):
    """2 checkpoints x 2 datasets x 3 sizes: each top-1/top-5 is what main_pretrain --eval_only writes to knn.json;
    a rerun computes nothing; changing one dataset's recipe recomputes only its cells."""
    monkeypatch.setenv("SCALEMAE_DATA", str(world["data"]))  # the data root from the environment
    suite = write_suite(tmp_path / "s.yaml", world)
    out = run_eval(["--suite", str(suite), "--output_dir", str(tmp_path / "o")])
    assert out["computed"] == 12 and out["cached"] == 0 and len(out["rows"]) == 12
    assert len({r["top1_k3"] for r in out["rows"]}) > 2  # the data separates cells: equality below means something
    flags = {"resisc": ["--eval_train_fnames", str(world["data"] / "resisc45" / "train.txt"),
                        "--eval_val_fnames", str(world["data"] / "resisc45" / "val.txt")],
             "eurosat": ["--eval_path", str(world["data"] / "eurosat"), "--seed", "0"]}
    names = {"a": world["ckpts"][0], "run1": world["ckpts"][1]}
    for ckpt_name, ckpt in names.items():
        for ds in ("resisc", "eurosat"):
            folder = tmp_path / f"verbatim-{ckpt_name}-{ds}"
            args = main_pretrain.get_args_parser().parse_args(
                ["--resume", str(ckpt), "--eval_only", "--eval_dataset", ds, *flags[ds], "--eval_scale",
                 *map(str, SIZES), "--eval_gsd", "--knn_ks", "3", "5", "--eval_batch_size", "8", "--device", "cpu",
                 "--num_workers", "0", "--output_dir", str(folder)])
            main_pretrain.main(args)
            verbatim = json.loads((folder / "knn.json").read_text())
            for size in SIZES:
                row = next(r for r in out["rows"] if r["checkpoint"] == ckpt_name and r["dataset"] == ds
                           and r["size"] == size)
                for k in (3, 5):
                    assert row[f"top1_k{k}"] == verbatim["scales"][str(size)]["k"][str(k)]["top1"], (ckpt_name, ds)
                    assert row[f"top5_k{k}"] == verbatim["scales"][str(size)]["k"][str(k)]["top5"]
                assert row["res"] == verbatim["scales"][str(size)]["res"]
    # the outputs
    for ext in ("md", "csv", "json", "png"):
        assert Path(out["paths"][ext]).is_file()
    mean = next(m for m in out["means"] if m["checkpoint"] == "a" and m["dataset"] == "resisc")
    cells = [r["acc"] for r in out["rows"] if r["checkpoint"] == "a" and r["dataset"] == "resisc" and r["size"] in
             (16, 32)]
    assert mean["acc"] == pytest.approx(sum(cells) / 2) and mean["diff"] == pytest.approx(mean["acc"] - 50.0)
    assert list((tmp_path / "o").glob("events.out.tfevents*"))
    # rerun: nothing computed, same numbers
    again = run_eval(["--suite", str(suite), "--output_dir", str(tmp_path / "o")])
    assert again["computed"] == 0 and again["cached"] == 12 and again["rows"] == out["rows"]
    # one dataset's recipe changes: only its 2 x 3 cells are computed
    suite = write_suite(tmp_path / "s.yaml", world, **{"datasets.eurosat.recipe": {"interpolation": "bicubic"}})
    changed = run_eval(["--suite", str(suite), "--output_dir", str(tmp_path / "o")])
    assert changed["computed"] == 6 and changed["cached"] == 6


def test_interrupted_run_resumes_with_only_the_missing_cells(world, tmp_path, monkeypatch):
    suite = write_suite(tmp_path / "s.yaml", world, **{"datasets.resisc": None,
                                                        "checkpoints": [str(world["ckpts"][0])]})
    argv = ["--suite", str(suite), "--data_root", str(world["data"]), "--output_dir", str(tmp_path / "o")]
    real = feats.extract
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(feats, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(argv)
    entries = list((tmp_path / "o" / "feature_cache").rglob("*.pt"))
    assert len(entries) == 2 and not list((tmp_path / "o" / "feature_cache").rglob("*.tmp"))
    monkeypatch.setattr(feats, "extract", real)
    resumed = run_eval(argv)
    assert resumed["computed"] == 1 and resumed["cached"] == 2
    fresh = run_eval(argv[:-1] + [str(tmp_path / "fresh")])
    assert fresh["computed"] == 3 and fresh["rows"] == resumed["rows"]
    entries[0].write_bytes(b"truncated")  # a damaged entry is recomputed, the others are read
    repaired = run_eval(argv)
    assert repaired["computed"] == 1 and repaired["rows"] == fresh["rows"]


# ------------------------------------------------------------------------------------------------ probe
def test_probe_equals_scikit_learn_directly(world, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dataloaders.scenes import random_split_indices

    suite = write_suite(tmp_path / "s.yaml", world, protocol="probe", **{
        "checkpoints": [str(world["ckpts"][0])], "datasets.eurosat": None, "datasets.resisc.sizes": [32],
        "datasets.resisc.reference_sizes": [32], "probe": {"C": [0.1, 1.0, 10.0], "bootstrap": 200}})
    out = run_eval(["--suite", str(suite), "--data_root", str(world["data"]), "--output_dir", str(tmp_path / "o")])
    (row,) = out["rows"]
    (entry_path,) = list((tmp_path / "o" / "feature_cache").rglob("*.pt"))
    entry = torch.load(entry_path, weights_only=True)
    x, y = entry["bank"].numpy(), entry["bank_labels"].numpy()
    fit, val = random_split_indices(len(y), 0.1, 0)
    val_acc = {}
    for c in (0.1, 1.0, 10.0):
        sk = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x[fit], y[fit])
        val_acc[c] = (sk.predict(x[val]) == y[val]).mean() * 100
    best = max(sorted(val_acc), key=lambda c: (val_acc[c], -c))
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=1000)).fit(x, y)
    acc = (sk.predict(entry["query"].numpy()) == entry["query_labels"].numpy()).mean() * 100
    assert row["C"] == best and row["acc"] == pytest.approx(acc, abs=1e-9)
    assert row["ci_low"] <= row["acc"] <= row["ci_high"]
    assert "knn5_top1" in row


def test_sweep_picks_the_recipe_on_validation_only(world, tmp_path, monkeypatch):
    """The chosen recipe is the one with the best validation accuracy, whatever the test accuracies are."""
    suite = write_suite(tmp_path / "s.yaml", world, protocol="probe", **{
        "checkpoints": [str(world["ckpts"][0])], "datasets.eurosat": None, "datasets.resisc.sizes": [32],
        "datasets.resisc.reference_sizes": [32], "probe": {"C": [1.0], "bootstrap": 0},
        "sweep": {"size": [16, 32], "pooling": ["cls", "mean"]}})
    out = run_eval(["--suite", str(suite), "--data_root", str(world["data"]), "--output_dir", str(tmp_path / "o"),
                    "--sweep"])
    (row,) = out["rows"]
    trials = json.loads(Path(out["paths"]["json"]).read_text())["sweep_trials"]["weights/resisc"]
    assert len(trials) == 4
    assert row["val_acc"] == max(t["val_acc"] for t in trials)
    assert row["recipe"] == next(t["recipe"] for t in trials if t["val_acc"] == row["val_acc"])


# ------------------------------------------------------------------------------------------------ two ranks
def test_two_process_gloo_equals_one_process(world, tmp_path):
    suite = write_suite(tmp_path / "s.yaml", world, **{"checkpoints": [str(world["ckpts"][0])],
                                                        "datasets.resisc.sizes": [16, 32],
                                                        "datasets.resisc.reference_sizes": [16],
                                                        "datasets.eurosat": None})
    common = ["--suite", str(suite), "--data_root", str(world["data"]), "--device", "cpu", "--num_workers", "0"]
    script = str(REPO / "main_eval.py")
    for name, launcher in (("one", [sys.executable, script]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", script])):
        proc = subprocess.run(launcher + common + ["--output_dir", str(tmp_path / name)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "tiny.json").read_text())["rows"]
    two = json.loads((tmp_path / "two" / "tiny.json").read_text())["rows"]
    assert [(r["size"], r["top1_k3"], r["top5_k5"]) for r in one] == [(r["size"], r["top1_k3"], r["top5_k5"])
                                                                     for r in two]
    for a, b in zip(sorted((tmp_path / "one" / "feature_cache").rglob("*.pt")),
                    sorted((tmp_path / "two" / "feature_cache").rglob("*.pt"))):
        assert a.name == b.name  # same cache key whatever the number of processes
        ea, eb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        torch.testing.assert_close(ea["bank"], eb["bank"], rtol=1e-5, atol=1e-5)
        assert ea["bank_labels"].tolist() == eb["bank_labels"].tolist()
