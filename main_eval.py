"""Evaluation suites: checkpoints x datasets x image sizes (or recipes), kNN or a frozen-feature probe, one table.

The paper's kNN table (Table 1 and the accuracy-vs-GSD figures):
    python main_eval.py --suite config/eval/paper_knn.yaml --data_root ~/data --checkpoints scalemae-vitlarge-800.pth
Frozen-encoder probe (kNN-5 + logistic regression, bootstrap intervals; --sweep picks the recipe on validation data):
    python main_eval.py --suite config/eval/frozen_probe.yaml --data_root ~/data [--sweep]
Several GPUs (features are sharded; kNN and probe run on rank 0):
    torchrun --nproc_per_node=8 main_eval.py --suite config/eval/paper_knn.yaml ...

Each cell's kNN numbers equal ``main_pretrain.py --eval_only`` for the same flags (same model build, transform,
feature extraction and kNN); features are cached under ``--cache_dir`` so reruns compute only what is missing.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from evaluation import features as feats
from evaluation.checkpoints import CheckpointInfo, build_eval_model, inspect_checkpoint
from evaluation.suite import DATA_ROOT_ENV, CheckpointSpec, DatasetSpec, Recipe, Suite, checkpoint_spec, load_suite, \
    resolve_data_root
from util import dist as dist_util
import harness


def get_args_parser() -> argparse.ArgumentParser:
    p = harness.ArgumentParser("Scale-MAE evaluation suites (kNN across GSDs, frozen-feature probe)", add_help=True)
    g = p.add_argument_group("suite")
    g.add_argument("--suite", required=True, help="suite YAML, e.g. config/eval/paper_knn.yaml")
    g.add_argument("--data_root", default=None,
                   help=f"folder that relative dataset roots resolve against (default ${DATA_ROOT_ENV}, else the "
                        f"repository's data/)")
    g.add_argument("--checkpoints", nargs="+", default=None,
                   help="replace the suite's checkpoints: paths, URLs or run folders (their checkpoint-latest.pth)")
    g.add_argument("--datasets", nargs="+", default=None, help="evaluate only these dataset rows of the suite")
    g.add_argument("--sweep", action="store_true",
                   help="probe suites: evaluate every recipe of the suite's sweep: section and keep, per dataset "
                        "and checkpoint, the one with the best validation accuracy (the test set is never used "
                        "to choose)")
    g.add_argument("--strict", action="store_true", help="a dataset root missing on disk is an error (default: "
                                                         "that dataset is skipped with one line)")
    g.add_argument("--cache_dir", default=None, help="feature cache (default <output_dir>/feature_cache)")
    g.add_argument("--output_dir", default="./output_eval", help="tables, plot, TensorBoard (default ./output_eval)")
    g.add_argument("--log_dir", default=None, help="TensorBoard events (default: --output_dir)")
    g.add_argument("--device", default="cuda", help="cuda or cpu; falls back to cpu when CUDA is unavailable")
    g.add_argument("--seed", default=0, type=int, help="torch/numpy seed (features do not depend on it)")
    g.add_argument("--debug", action="store_true", help=f"tracebacks of errors (also {harness.DEBUG_ENV}=1)")
    harness.add_loader_args(g)
    harness.add_distributed_args(p)
    return p


# ------------------------------------------------------------------------------------------------- checks
def check_sizes(suite: Suite, infos: list[CheckpointInfo], sweep: bool) -> None:
    """Every evaluated size is a multiple of every checkpoint's patch (one line before any work)."""
    for spec in suite.datasets:
        sizes = [r.size for r in (spec.sweep_recipes() if sweep else spec.recipes)]
        for info in infos:
            bad = sorted({s for s in sizes if s % info.patch})
            if bad:
                s = bad[0]
                lo, hi = max(info.patch, s // info.patch * info.patch), (s // info.patch + 1) * info.patch
                raise harness.UserError(f"suite {suite.path}: datasets.{spec.name}: size {s} px is not a multiple of "
                                        f"the patch {info.patch} of checkpoint {info.name} ({info.model}); use "
                                        f"{lo} or {hi}")


def present_datasets(suite: Suite, strict: bool) -> list[DatasetSpec]:
    """The dataset rows whose root exists; a missing root is one line (skipped) or, with --strict, an error."""
    out = [spec for spec in suite.datasets if spec.root.is_dir()]
    if not out:  # one error line, not a warning per dataset first
        raise harness.UserError(f"suite {suite.path}: none of its dataset roots exists under the data root "
                                f"({', '.join(str(s.root) for s in suite.datasets[:3])}"
                                f"{' ...' if len(suite.datasets) > 3 else ''}): set --data_root or ${DATA_ROOT_ENV}")
    for spec in suite.datasets:
        if spec in out:
            continue
        line = (f"datasets.{spec.name}: root {spec.root} not found (set --data_root or ${DATA_ROOT_ENV}; the README's "
                f"'Reproduce the paper's tables' says where each dataset comes from)")
        if strict:
            raise harness.UserError(line)
        print(f"WARNING: {line}; skipped")
    return out


def warn_data(spec: DatasetSpec, data: feats.CellData, suite: Suite) -> None:
    """The warnings ``main_pretrain.py --eval_only`` gives for the same data: a k above the bank size, query classes
    the bank lacks."""
    from dataloaders.scenes import warn_unseen_classes

    bank = len(data.bank)
    k = max(max(r.k) for r in spec.recipes) if suite.protocol == "knn" else int(suite.probe["knn_k"])
    if k > bank:
        print(f"WARNING: datasets.{spec.name}: k {k} is larger than the kNN bank ({bank} images): k is clipped to "
              f"{bank}, so every query votes with the whole bank")
    warn_unseen_classes(data.bank, data.query, f"the bank of datasets.{spec.name}")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (unchanged without a process group)."""
    if not dist_util.is_dist_avail_and_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# -------------------------------------------------------------------------------------------------- metrics
def knn_row(entry: dict, recipe: Recipe, num_classes: int) -> dict:
    from util.knn_eval import knn_accuracies

    per_k = knn_accuracies(entry["bank"], entry["bank_labels"], entry["query"], entry["query_labels"], recipe.k,
                           recipe.temperature, num_classes)
    row: dict[str, Any] = {"acc": per_k[recipe.k[0]]["top1"]}
    for k, acc in per_k.items():
        row[f"top1_k{k}"], row[f"top5_k{k}"] = acc["top1"], acc["top5"]
    return row


def probe_row(entry: dict, recipe: Recipe, num_classes: int, probe: dict) -> dict:
    from evaluation.probe import bootstrap_ci, probe_accuracy, select_C
    from util.knn_eval import knn_accuracies

    k = int(probe["knn_k"])
    knn = knn_accuracies(entry["bank"], entry["bank_labels"], entry["query"], entry["query_labels"], [k],
                         recipe.temperature, num_classes)[k]
    best_c, val = select_C(entry["bank"], entry["bank_labels"], probe["C"], probe["val_fraction"], probe["seed"],
                           probe["max_iter"])
    acc, correct = probe_accuracy(entry["bank"], entry["bank_labels"], entry["query"], entry["query_labels"], best_c,
                                  probe["max_iter"])
    lo, hi = bootstrap_ci(correct, probe["bootstrap"], probe["confidence"], probe["seed"])
    return {"acc": acc, "ci_low": lo, "ci_high": hi, "C": best_c, "val_acc": val[best_c],
            f"knn{k}_top1": knn["top1"], "val_by_C": val}


# ------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    """Run a suite; returns ``{"rows", "means", "computed", "cached", "paths"}`` (rows and means on rank 0 only)."""
    suite = load_suite(args.suite, resolve_data_root(args.data_root), args.datasets)  # a bad suite: before any set-up
    device = harness.setup(args)
    if args.checkpoints:
        specs = [checkpoint_spec(s, Path.cwd()) for s in args.checkpoints]
        names = [c.name for c in specs]
        if len(set(names)) != len(names):
            specs = [CheckpointSpec(f"{i}-{c.name}", c.source) for i, c in enumerate(specs)]
        suite.checkpoints = specs
    if args.sweep and (suite.protocol != "probe" or not any(d.sweep for d in suite.datasets)):
        raise harness.UserError(f"--sweep: suite {suite.path} has no sweep: section for the probe protocol "
                                f"(protocol {suite.protocol}); drop --sweep or use config/eval/frozen_probe.yaml")
    rows_spec = present_datasets(suite, args.strict)  # before reading (maybe downloading) any checkpoint
    infos = [inspect_checkpoint(c.name, c.source, suite.model) for c in suite.checkpoints]
    check_sizes(suite, infos, args.sweep)  # every row of the suite, present on this disk or not
    out_dir = harness.make_folder(args.output_dir, "--output_dir") if dist_util.is_main_process() \
        else Path(args.output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir / "feature_cache"
    if args.log_dir is None:
        args.log_dir = str(out_dir)

    # --- the plan: every cell, its cache file, and what is missing (decided on rank 0 for every rank)
    data: dict[tuple, feats.CellData] = {}

    def cell_data(spec: DatasetSpec, recipe: Recipe) -> feats.CellData:
        key = (spec.name, recipe.normalization)
        if key not in data:
            data[key] = feats.build_datasets(spec, recipe)
            if key[1] == spec.recipes[0].normalization:  # the same files under every normalisation: warn once
                warn_data(spec, data[key], suite)
        return data[key]

    cells = []
    for info in infos:
        for spec in rows_spec:
            for recipe in (spec.sweep_recipes() if args.sweep else spec.recipes):
                d = cell_data(spec, recipe)
                path = feats.cache_path(cache_dir, feats.cache_key(info.weights, d.fingerprint, recipe))
                cells.append((info, spec, recipe, path))
    missing = broadcast([i for i, c in enumerate(cells) if not c[3].is_file()])
    print(f"suite {suite.name}: {len(infos)} checkpoint(s) x {len(rows_spec)} dataset(s): {len(cells)} cell(s), "
          f"{len(cells) - len(missing)} cached, {len(missing)} to compute (cache {cache_dir})")

    # --- features of the missing cells: every rank extracts its shard, rank 0 writes the cache entry
    computed, spent = 0, 0.0
    model, model_of = None, None  # one model in memory at a time

    def compute(i: int) -> dict:
        nonlocal model, model_of, computed, spent
        info, spec, recipe, path = cells[i]
        if model_of != info.name:
            model, model_of = None, None
            model, model_of = build_eval_model(info, device), info.name
        start = time.perf_counter()
        entry = feats.extract(model, cell_data(spec, recipe), recipe, device, num_workers=min(args.num_workers, 4))
        elapsed = time.perf_counter() - start
        if dist_util.is_main_process():
            entry["meta"] = {"checkpoint": info.source, "weights": info.weights, "dataset": spec.name,
                             "recipe": {f: getattr(recipe, f) for f in feats.FEATURE_FIELDS},
                             "code_version": feats.FEATURE_CODE_VERSION}
            feats.write_entry(path, entry)
        computed += 1
        spent += elapsed
        left = sum(1 for j in missing if j > i)
        n_img = entry["bank"].shape[0] + entry["query"].shape[0]
        print(f"{label(i)}: features of {n_img} images in {elapsed:.1f} s ({n_img / max(elapsed, 1e-9):.0f} img/s); "
              f"{left} cell(s) left, ETA {_duration(spent / computed * left)}")
        return entry

    def label(i: int) -> str:
        info, spec, recipe, _ = cells[i]
        return f"[{i + 1}/{len(cells)}] {info.name} | {spec.name} | {recipe.describe()}"

    for i in missing:
        compute(i)
    model = None
    dist_util.barrier()  # every shard is in; the other ranks are done

    # --- scores on rank 0, from the cache (kNN and probe need no other rank)
    results: list[dict] = []
    cached = len(cells) - len(missing)
    for i, (info, spec, recipe, path) in enumerate(cells if dist_util.is_main_process() else []):
        entry = feats.read_entry(path)
        if entry is None:  # removed or damaged since the plan: recompute (one process only: no collectives here)
            if dist_util.get_world_size() > 1:
                path.unlink(missing_ok=True)
                raise harness.UserError(f"feature cache entry {path} vanished or was damaged (it was there at "
                                        f"start-up; now removed): run again, it will be recomputed")
            entry = compute(i)
            cached -= 1
        d = cell_data(spec, recipe)
        if suite.protocol == "knn":
            scores = knn_row(entry, recipe, d.num_classes)
        else:
            scores = probe_row(entry, recipe, d.num_classes, suite.probe)
        print(f"{label(i)}: {'top-1' if suite.protocol == 'knn' else 'probe'} {scores['acc']:.2f} %")
        results.append({"checkpoint": info.name, "dataset": spec.name, "size": recipe.size,
                        "native_size": spec.native_size, "scale": recipe.size / spec.native_size,
                        "res": _res(recipe), "recipe": recipe.describe(), **scores})

    out: dict[str, Any] = {"computed": computed, "cached": cached}
    if dist_util.is_main_process():
        out.update(_finish(args, suite, rows_spec, infos, results, out_dir))
    dist_util.cleanup()
    return out


def _res(recipe: Recipe) -> float:
    from util.gsd import eval_res

    return eval_res(recipe.size, recipe.base_resolution, recipe.eval_gsd)


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def choose_by_validation(results: list[dict]) -> tuple[list[dict], dict]:
    """--sweep: per (checkpoint, dataset) the candidate recipe with the best validation accuracy (ties: the first);
    returns the chosen rows and every candidate's validation accuracy."""
    chosen, trials = [], {}
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["checkpoint"], r["dataset"]), []).append(r)
    for (ckpt, ds), cands in groups.items():
        best = max(cands, key=lambda r: r["val_acc"])  # max keeps the first of equal ones
        chosen.append(best)
        trials[f"{ckpt}/{ds}"] = [{"recipe": r["recipe"], "val_acc": r["val_acc"]} for r in cands]
    return chosen, trials


def _finish(args, suite: Suite, specs: list[DatasetSpec], infos: list[CheckpointInfo], results: list[dict],
            out_dir: Path) -> dict:
    from evaluation.report import format_markdown, log_scalars, mean_rows, plot_suite, write_tables

    trials: Optional[dict] = None
    if args.sweep:
        results, trials = choose_by_validation(results)
    rows = list(results)
    refs = {s.name: (s.reference, s.reference_sizes if not args.sweep else ()) for s in specs}
    means = mean_rows(rows, refs)
    result = {"suite": suite.name, "protocol": suite.protocol, "sweep": bool(args.sweep),
              "checkpoints": {i.name: {"source": i.source, "model": i.model, "weights_sha256": i.weights}
                              for i in infos},
              "datasets": {s.name: {"dataset": s.dataset, "root": str(s.root), "native_size": s.native_size,
                                    "reference": s.reference, "reference_sizes": list(s.reference_sizes)}
                           for s in specs},
              "rows": rows, "means": means}
    if trials is not None:
        result["sweep_trials"] = trials
    name = suite.name + ("-sweep" if args.sweep else "")
    paths = write_tables(out_dir, name, result)
    ylabel = "kNN top-1 (%)" if suite.protocol == "knn" else "probe accuracy (%)"
    png = plot_suite(rows, out_dir / f"{name}.png", ylabel)
    if png is not None:
        paths["png"] = png
    log_scalars(args.log_dir, name, rows)
    print(format_markdown(f"{name} ({suite.protocol})", rows + means))
    print("tables: " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "means": means, "paths": {k: str(v) for k, v in paths.items()}}


if __name__ == "__main__":
    harness.run(main, get_args_parser())
