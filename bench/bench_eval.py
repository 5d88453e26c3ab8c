"""Cost of an evaluation suite (``main_eval.py``): features/s per size, kNN and probe time, cold and cached runs.

Builds a synthetic dataset (ImageFolder + split lists, the shipped layout) and a randomly initialised checkpoint in
a temporary folder, then runs one kNN suite twice through ``main_eval.main``: cold (every cell's features computed
and cached) and cached (nothing computed). kNN and probe times are measured on the cached features of the largest
size. Prints one JSON object::

    python bench/bench_eval.py                                   # tiny: ~10-20 s on 2 cores
    python bench/bench_eval.py --model mae_vit_large_patch16 --side 256 --sizes 32 64 128 256 --per_class 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_data(root: Path, classes: int, per_class: int, side: int, seed: int = 0) -> None:
    """``root/<class>/<i>.png`` plus ``train.txt`` / ``val.txt`` (3 of 4 images train)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(100 + 20 * c, 50, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
            (val if i % 4 == 3 else train).append(f"./c{c}/{i}.png")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("\n".join(val) + "\n")


def run(model: str, classes: int, per_class: int, side: int, sizes: list[int], batch_size: int) -> dict:
    import torch
    import yaml

    import main_eval
    import models_mae
    from evaluation import features as feats
    from evaluation.suite import PROBE_DEFAULTS, Recipe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data" / "bench", classes, per_class, side)
        torch.manual_seed(0)
        weights = models_mae.MODELS[model]().state_dict()
        torch.save({"model": weights, "args": {"model": model}}, tmp / "ckpt.pth")
        suite = {"suite": "bench", "protocol": "knn", "checkpoints": [str(tmp / "ckpt.pth")],
                 "recipe": {"k": [20], "batch_size": batch_size},
                 "datasets": {"bench": {"dataset": "resisc", "root": "bench", "train": "train.txt", "val": "val.txt",
                                        "native_size": side, "sizes": sizes}}}
        (tmp / "suite.yaml").write_text(yaml.safe_dump(suite))
        argv = ["--suite", str(tmp / "suite.yaml"), "--data_root", str(tmp / "data"), "--output_dir", str(tmp / "out"),
                "--device", "cpu", "--num_workers", "0"]

        per_size: dict[int, dict] = {}
        real = feats.extract

        def timed(model_, data, recipe, device, num_workers=0):
            start = time.perf_counter()
            out = real(model_, data, recipe, device, num_workers=num_workers)
            seconds = time.perf_counter() - start
            n = out["bank"].shape[0] + out["query"].shape[0]
            per_size[recipe.size] = {"images": n, "seconds": round(seconds, 4), "features_per_s": round(n / seconds, 1)}
            return out

        feats.extract = timed
        try:
            start = time.perf_counter()
            cold = main_eval.main(main_eval.get_args_parser().parse_args(argv))
            cold_s = time.perf_counter() - start
        finally:
            feats.extract = real
        start = time.perf_counter()
        cached = main_eval.main(main_eval.get_args_parser().parse_args(argv))
        cached_s = time.perf_counter() - start

        (entry_path,) = [p for p in (tmp / "out" / "feature_cache").rglob("*.pt")
                         if torch.load(p, weights_only=True)["meta"]["recipe"]["size"] == max(sizes)]
        entry = torch.load(entry_path, weights_only=True)
        recipe = Recipe(size=max(sizes), k=(20,))
        start = time.perf_counter()
        main_eval.knn_row(entry, recipe, classes)
        knn_s = time.perf_counter() - start

        start = time.perf_counter()
        main_eval.probe_row(entry, recipe, classes, dict(PROBE_DEFAULTS))
        probe_s = time.perf_counter() - start
    return {
        "model": model, "images": classes * per_class, "side": side, "sizes": sizes, "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "features_per_size": {str(k): v for k, v in sorted(per_size.items())},
        "cold": {"seconds": round(cold_s, 3), "cells_computed": cold["computed"]},
        "cached": {"seconds": round(cached_s, 3), "cells_computed": cached["computed"],
                   "cells_cached": cached["cached"]},
        "knn_seconds": round(knn_s, 4),
        "probe_seconds": round(probe_s, 4),
        "probe_C_grid": PROBE_DEFAULTS["C"], "probe_bootstrap": PROBE_DEFAULTS["bootstrap"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per_class", type=int, default=16)
    p.add_argument("--side", type=int, default=64, help="native image side (px)")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch_size", type=int, default=32)
    a = p.parse_args()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the launcher's table and progress lines
        result = run(a.model, a.classes, a.per_class, a.side, a.sizes, a.batch_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
