"""The suite YAML of ``main_eval.py``: what to evaluate (checkpoints x datasets x recipes) and how.

Schema (every key is checked; an unknown key or a bad value is one ``UserError`` line naming the file and key)::

    suite: paper_knn                 # name (default: the file's stem)
    protocol: knn                    # knn | probe (kNN-k + logistic regression on frozen features)
    model: mae_vit_large_patch16     # optional: every checkpoint must be this architecture
    checkpoints:                     # paths, URLs or run folders (their checkpoint-latest.pth)
      - path: https://.../scalemae-vitlarge-800.pth
        name: scalemae-large         # optional (default: the file or folder name)
      - {root: runs/, exp_ids: [a, b]}   # run folders root/a, root/b (the original eval launcher's form)
    recipe: {...}                    # defaults for every dataset (keys: RECIPE_DEFAULTS)
    probe: {...}                     # probe protocol options (keys: PROBE_DEFAULTS)
    sweep: {size: [...], pooling: [cls, mean], ...}   # candidates for --sweep (probe protocol)
    datasets:
      resisc:                        # row name
        dataset: resisc              # dataset id (normalisation, transform); default: the row name
        root: resisc45               # relative to --data_root / $SCALEMAE_DATA, or absolute
        train: train.txt             # bank / training split (list file or folder, relative to root) ...
        val: val.txt                 # ... and queries / test split; without both: a seeded 90/10 split of root
        split_seed: 0
        native_size: 256
        sizes: [16, 32, 64, 128, 256]     # or scales: [0.125, 0.25, ...] (fractions of native_size)
        reference: 70.0              # the paper's number (mean over reference_sizes), optional
        reference_sizes: [32, 64, 128, 256]
        recipe: {...}                # overrides of the suite recipe
        sweep: {...}                 # overrides of the suite sweep
"""
from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from harness import UserError

__all__ = ["Recipe", "CheckpointSpec", "DatasetSpec", "Suite", "load_suite", "DATA_ROOT_ENV", "resolve_data_root",
           "RECIPE_DEFAULTS", "PROBE_DEFAULTS", "checkpoint_spec"]

DATA_ROOT_ENV = "SCALEMAE_DATA"
PROTOCOLS = ("knn", "probe")
POOLINGS = ("cls", "mean")
TOP_KEYS = ("suite", "protocol", "model", "checkpoints", "recipe", "probe", "sweep", "datasets", "description")
DATASET_KEYS = ("dataset", "root", "train", "val", "split_seed", "native_size", "sizes", "scales", "reference",
                "reference_sizes", "recipe", "sweep")
CHECKPOINT_KEYS = ("path", "name", "root", "exp_ids")
RECIPE_DEFAULTS: dict[str, Any] = {
    "interpolation": "area",   # resize of each batch to the evaluated size (area: the original's)
    "eval_gsd": True,          # res = base_resolution * 224 / size (False: res = base_resolution)
    "base_resolution": 1.0,    # --eval_base_resolution
    "pooling": "cls",          # cls token after the final norm (the original's kNN feature) or mean of patch tokens
    "normalization": None,     # dataset id whose mean/std normalise the images (default: the dataset's own)
    "k": [20],                 # kNN k values (the first is the headline number)
    "temperature": 0.07,       # kNN vote weight exp(sim / T)
    "batch_size": 64,          # feature-extraction batch (main_pretrain --eval_only's default)
    "amp": "none",             # none | bf16 | fp16 autocast of the feature extraction
}
PROBE_DEFAULTS: dict[str, Any] = {
    "C": [0.01, 0.1, 1.0, 10.0, 100.0],  # inverse L2 strength grid of the logistic regression
    "val_fraction": 0.1,       # share of the training split held out to choose C (and the recipe in --sweep)
    "seed": 0,                 # of that split and of the bootstrap
    "bootstrap": 1000,         # resamples of the test set for the confidence interval
    "confidence": 0.95,
    "max_iter": 1000,
    "knn_k": 5,                # kNN-k reported beside the probe
}
SWEEP_KEYS = ("size",) + tuple(k for k in RECIPE_DEFAULTS if k not in ("k", "temperature", "batch_size"))


@dataclass(frozen=True)
class Recipe:
    """How one cell's features are made (and scored): every field that changes a feature is in the cache key."""

    size: int
    interpolation: str = "area"
    eval_gsd: bool = True
    base_resolution: float = 1.0
    pooling: str = "cls"
    normalization: Optional[str] = None
    k: tuple = (20,)
    temperature: float = 0.07
    batch_size: int = 64
    amp: str = "none"

    def describe(self) -> str:
        """Short text of the non-default fields, e.g. ``64 px, bicubic, mean``."""
        parts = [f"{self.size} px"]
        for name in ("interpolation", "pooling"):
            if getattr(self, name) != RECIPE_DEFAULTS[name]:
                parts.append(str(getattr(self, name)))
        if not self.eval_gsd:
            parts.append(f"res {self.base_resolution:g}")
        elif self.base_resolution != 1.0:
            parts.append(f"base res {self.base_resolution:g}")
        if self.normalization:
            parts.append(f"{self.normalization} stats")
        return ", ".join(parts)


@dataclass(frozen=True)
class CheckpointSpec:
    name: str
    source: str  # path or URL as written (run folders already resolved to their checkpoint-latest.pth)


@dataclass
class DatasetSpec:
    name: str
    dataset: str
    root: Path
    train: Optional[str]
    val: Optional[str]
    split_seed: int
    native_size: int
    recipes: list  # list[Recipe], one per evaluated size
    reference: Optional[float] = None
    reference_sizes: tuple = ()
    sweep: dict = field(default_factory=dict)  # recipe key -> candidates

    def sweep_recipes(self) -> list:
        """Every candidate recipe of ``--sweep`` (cartesian product over the sweep keys, others from the recipe)."""
        base = self.recipes[0]
        keys = sorted(self.sweep)
        out = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            out.append(replace(base, **dict(zip(keys, values))))
        return out


@dataclass
class Suite:
    name: str
    path: Path
    protocol: str
    model: Optional[str]
    checkpoints: list  # list[CheckpointSpec]
    datasets: list  # list[DatasetSpec]
    probe: dict


def _closest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"


def _check_keys(entry: Any, allowed: Sequence[str], where: str, path: Path) -> dict:
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise UserError(f"suite {path}: {where} must be a mapping, got {type(entry).__name__}")
    for key in entry:
        if key not in allowed:
            raise UserError(f"suite {path}: unknown key {where}.{key}{_closest(key, allowed)}")
    return dict(entry)


def _int_list(value: Any, where: str, path: Path) -> list:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise UserError(f"suite {path}: {where} must be positive integers, got {value!r}")
    return [int(v) for v in values]


def _recipe_fields(entry: dict, where: str, path: Path) -> dict:
    from dataloaders.eval_sets import eval_stats
    from util.knn_eval import INTERPOLATIONS

    out = {}
    for key, value in entry.items():
        if key == "interpolation" and value not in INTERPOLATIONS:
            raise UserError(f"suite {path}: {where}.interpolation {value!r}: expected one of {INTERPOLATIONS}")
        if key == "pooling" and value not in POOLINGS:
            raise UserError(f"suite {path}: {where}.pooling {value!r}: expected one of {POOLINGS}")
        if key == "amp" and value not in ("none", "bf16", "fp16"):
            raise UserError(f"suite {path}: {where}.amp {value!r}: expected none, bf16 or fp16")
        if key == "eval_gsd" and not isinstance(value, bool):
            raise UserError(f"suite {path}: {where}.eval_gsd must be true or false, got {value!r}")
        if key in ("base_resolution", "temperature") and not (isinstance(value, (int, float)) and value > 0):
            raise UserError(f"suite {path}: {where}.{key} must be a positive number, got {value!r}")
        if key == "normalization" and value is not None:
            try:
                eval_stats(str(value))
            except ValueError as err:
                raise UserError(f"suite {path}: {where}.normalization: {err}") from None
        if key == "k":
            value = tuple(_int_list(value, f"{where}.k", path))
        if key == "batch_size":
            value = _int_list(value, f"{where}.batch_size", path)[0]
        out[key] = value
    return out


def resolve_data_root(flag: Optional[str]) -> Path:
    """Where relative dataset roots live: ``--data_root``, else ``$SCALEMAE_DATA``, else the repository's data/."""
    from harness.output import DEFAULT_DATA_ROOT

    chosen = flag or os.environ.get(DATA_ROOT_ENV) or str(DEFAULT_DATA_ROOT)
    return Path(os.path.expanduser(chosen))


def _checkpoints(entries: Any, path: Path) -> list:
    if not isinstance(entries, list) or not entries:
        raise UserError(f"suite {path}: checkpoints must be a non-empty list (paths, URLs, run folders, or "
                        f"{{root, exp_ids}})")
    base = path.parent
    out = []
    for i, item in enumerate(entries):
        item = {"path": item} if isinstance(item, str) else _check_keys(item, CHECKPOINT_KEYS, f"checkpoints[{i}]",
                                                                          path)
        if "exp_ids" in item or "root" in item:
            if not item.get("root") or not isinstance(item.get("exp_ids"), list) or "path" in item:
                raise UserError(f"suite {path}: checkpoints[{i}]: give root and a list exp_ids (run folders "
                                f"root/<id>), or a path")
            for exp in item["exp_ids"]:
                out.append(checkpoint_spec(str(Path(str(item["root"])) / str(exp)), base, str(exp)))
            continue
        if not item.get("path"):
            raise UserError(f"suite {path}: checkpoints[{i}] has no path")
        out.append(checkpoint_spec(str(item["path"]), base, item.get("name")))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"suite {path}: checkpoint names must differ, {dup} repeat (give each a name)")
    return out


def checkpoint_spec(src: str, base: Path, name: Optional[str] = None) -> CheckpointSpec:
    """A checkpoint given as a path (relative to ``base`` when it exists there), URL or run folder; named by
    ``name``, else its file or folder name."""
    resolved = _source(src, base)
    return CheckpointSpec(str(name or _default_name(resolved)), resolved)


def _source(src: str, base: Path) -> str:
    """A URL as is; a path expanded (``~``), relative paths against the suite file's folder when they exist there;
    a run folder becomes its ``checkpoint-latest.pth``."""
    if "://" in src:
        return src
    p = Path(os.path.expanduser(src))
    if not p.is_absolute() and not p.exists() and (base / p).exists():
        p = base / p
    if p.is_dir():
        p = p / "checkpoint-latest.pth"
    return str(p)


def _default_name(src: str) -> str:
    p = Path(src.split("#")[0].rstrip("/"))
    if p.name == "checkpoint-latest.pth":
        return p.parent.name
    return p.stem


def _sizes(d: dict, native: int, where: str, path: Path) -> list:
    if "sizes" in d and "scales" in d:
        raise UserError(f"suite {path}: {where}: give sizes or scales, not both")
    if "scales" in d:
        scales = d["scales"] if isinstance(d["scales"], list) else [d["scales"]]
        sizes = []
        for s in scales:
            side = float(s) * native
            if not (isinstance(s, (int, float)) and s > 0) or abs(side - round(side)) > 1e-6:
                raise UserError(f"suite {path}: {where}.scales {s!r}: native_size {native} x scale must be a whole "
                                f"number of pixels")
            sizes.append(int(round(side)))
        return sizes
    if "sizes" not in d:
        raise UserError(f"suite {path}: {where}: no sizes (or scales) to evaluate")
    return _int_list(d["sizes"], f"{where}.sizes", path)


def load_suite(path: str | os.PathLike, data_root: Path, only: Optional[Sequence[str]] = None) -> Suite:
    """Parse and check a suite file. ``only`` keeps those dataset rows (unknown names are an error)."""
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).resolve().parent.parent / "config" / "eval"
        names = ", ".join(f"config/eval/{p.name}" for p in sorted(shipped.glob("*.yaml")))
        raise UserError(f"--suite {path}: file not found (shipped suites: {names})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"suite {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    top = _check_keys(raw, TOP_KEYS, "<top level>", path)
    protocol = top.get("protocol", "knn")
    if protocol not in PROTOCOLS:
        raise UserError(f"suite {path}: protocol {protocol!r}: expected one of {PROTOCOLS}")
    model = top.get("model")
    if model is not None:
        import models_mae

        if model not in models_mae.MODELS:
            raise UserError(f"suite {path}: model {model!r} is not a pretraining model; choose from "
                            f"{sorted(models_mae.MODELS)}")
    recipe = dict(RECIPE_DEFAULTS)
    recipe.update(_recipe_fields(_check_keys(top.get("recipe"), tuple(RECIPE_DEFAULTS), "recipe", path), "recipe",
                                 path))
    probe = dict(PROBE_DEFAULTS)
    probe.update(_check_keys(top.get("probe"), tuple(PROBE_DEFAULTS), "probe", path))
    if not (isinstance(probe["val_fraction"], float) and 0 < probe["val_fraction"] < 1):
        raise UserError(f"suite {path}: probe.val_fraction must be in (0, 1), got {probe['val_fraction']!r}")
    grid = probe["C"] if isinstance(probe["C"], list) else [probe["C"]]
    if not grid or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in grid):
        raise UserError(f"suite {path}: probe.C must be positive numbers, got {probe['C']!r}")
    probe["C"] = [float(c) for c in grid]
    for key in ("knn_k", "max_iter"):
        probe[key] = _int_list(probe[key], f"probe.{key}", path)[0]
    if not (isinstance(probe["bootstrap"], int) and probe["bootstrap"] >= 0):
        raise UserError(f"suite {path}: probe.bootstrap must be a whole number >= 0, got {probe['bootstrap']!r}")
    if not (isinstance(probe["confidence"], float) and 0 < probe["confidence"] < 1):
        raise UserError(f"suite {path}: probe.confidence must be in (0, 1), got {probe['confidence']!r}")
    sweep = _check_keys(top.get("sweep"), SWEEP_KEYS, "sweep", path)
    checkpoints = _checkpoints(top.get("checkpoints"), path)

    rows = top.get("datasets")
    if not isinstance(rows, Mapping) or not rows:
        raise UserError(f"suite {path}: datasets must be a non-empty mapping of name -> recipe")
    if only:
        missing = [n for n in only if n not in rows]
        if missing:
            raise UserError(f"--datasets {' '.join(missing)}: not in suite {path} (it has {', '.join(rows)})")
    datasets = []
    for name, entry in rows.items():
        if only and name not in only:
            continue
        where = f"datasets.{name}"
        d = _check_keys(entry, DATASET_KEYS, where, path)
        datasets.append(_dataset(str(name), d, recipe, sweep, data_root, where, path))
    return Suite(str(top.get("suite") or path.stem), path, protocol, model, checkpoints, datasets, probe)


def _dataset(name: str, d: dict, recipe: dict, sweep: dict, data_root: Path, where: str, path: Path) -> DatasetSpec:
    from dataloaders.eval_sets import eval_stats

    dataset_id = str(d.get("dataset", name)).lower()
    try:
        eval_stats(dataset_id)
    except ValueError as err:
        raise UserError(f"suite {path}: {where}.dataset: {err}") from None
    if not d.get("root"):
        raise UserError(f"suite {path}: {where}: no root (the dataset folder, relative to --data_root)")
    if ("train" in d) != ("val" in d):
        raise UserError(f"suite {path}: {where}: give both train and val (split lists or folders), or neither "
                        f"(a seeded 90/10 split of root)")
    native = _int_list(d.get("native_size"), f"{where}.native_size", path)[0] if "native_size" in d else None
    if native is None:
        raise UserError(f"suite {path}: {where}: no native_size (the images' side in px)")
    sizes = _sizes(d, native, where, path)
    own = dict(recipe)
    own.update(_recipe_fields(_check_keys(d.get("recipe"), tuple(RECIPE_DEFAULTS), f"{where}.recipe", path),
                              f"{where}.recipe", path))
    own["k"] = tuple(own["k"])
    recipes = [Recipe(size=s, **own) for s in sizes]
    own_sweep = dict(sweep)
    own_sweep.update(_check_keys(d.get("sweep"), SWEEP_KEYS, f"{where}.sweep", path))
    for key, values in own_sweep.items():
        values = values if isinstance(values, list) else [values]
        if key == "size":
            values = _int_list(values, f"{where}.sweep.size", path)
        else:
            values = [_recipe_fields({key: v}, f"{where}.sweep", path)[key] for v in values]
        own_sweep[key] = values
    reference = d.get("reference")
    if reference is not None and not isinstance(reference, (int, float)):
        raise UserError(f"suite {path}: {where}.reference must be a number (accuracy in %), got {reference!r}")
    ref_sizes = tuple(_int_list(d["reference_sizes"], f"{where}.reference_sizes", path)) \
        if "reference_sizes" in d else tuple(sizes)
    absent = [s for s in ref_sizes if s not in sizes]
    if absent:
        raise UserError(f"suite {path}: {where}.reference_sizes {absent} are not among its sizes {sizes}")
    root = Path(os.path.expanduser(str(d["root"])))
    root = root if root.is_absolute() else data_root / root
    return DatasetSpec(name=name, dataset=dataset_id, root=root, train=d.get("train"), val=d.get("val"),
                       split_seed=int(d.get("split_seed", 0)), native_size=native, recipes=recipes,
                       reference=None if reference is None else float(reference), reference_sizes=ref_sizes,
                       sweep=own_sweep)
