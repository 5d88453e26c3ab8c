"""Frozen features of a (checkpoint, dataset, recipe) cell: sharded extraction and an on-disk cache.

Extraction is ``util.knn_eval.extract_features`` (the function behind ``main_pretrain.py --eval_only``) over a
``ShardSampler`` per rank, gathered on every rank and put back in dataset order (so a cache entry does not depend
on the number of processes). The cache file of a cell is named by the sha256 of everything that changes its
features: the weights hash, the dataset's samples (relative paths, labels, file sizes) and transform, the recipe's
feature fields and :data:`FEATURE_CODE_VERSION` (bump it whenever the feature path changes its numbers). Entries are
written atomically (one call, :func:`write_entry`), so an interrupted run leaves only whole entries and a rerun
computes what is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from evaluation.suite import DatasetSpec, Recipe

__all__ = ["FEATURE_CODE_VERSION", "CellData", "build_datasets", "cache_key", "cache_path", "read_entry",
           "write_entry", "extract", "FEATURE_FIELDS"]

FEATURE_CODE_VERSION = 1
FEATURE_FIELDS = ("size", "interpolation", "eval_gsd", "base_resolution", "pooling", "normalization", "amp")


@dataclass
class CellData:
    """The two splits of a dataset row: ``bank`` (kNN bank / probe training) and ``query`` (queries / test)."""

    bank: Dataset
    query: Dataset
    num_classes: int
    fingerprint: str  # sha256 of the samples and the transform


def _transform(spec: DatasetSpec, recipe: Recipe) -> Callable:
    from torchvision import transforms as T

    from dataloaders.eval_sets import eval_stats, eval_transform

    tf = eval_transform(spec.dataset, "knn")
    if recipe.normalization and recipe.normalization.lower() != spec.dataset:
        mean, std = eval_stats(recipe.normalization)
        tf = T.Compose([T.Normalize(mean, std) if isinstance(t, T.Normalize) else t for t in tf.transforms])
    return tf


def build_datasets(spec: DatasetSpec, recipe: Recipe) -> CellData:
    """The row's splits as ``main_pretrain.py --eval_only`` builds them (``--eval_train_fnames/--eval_val_fnames``
    relative to the root, else ``--eval_path root`` with ``--seed split_seed``), with the recipe's normalisation."""
    from dataloaders.builders import build_eval_datasets

    tf = _transform(spec, recipe)
    if spec.train is not None:
        bank, query, n = build_eval_datasets(spec.dataset, train_fnames=spec.root / spec.train,
                                             val_fnames=spec.root / spec.val, seed=spec.split_seed, transform=tf)
    else:
        bank, query, n = build_eval_datasets(spec.dataset, eval_path=spec.root, seed=spec.split_seed, transform=tf)
    return CellData(bank, query, n, _fingerprint(spec, bank, query, tf))


def _fingerprint(spec: DatasetSpec, bank: Dataset, query: Dataset, tf: Callable) -> str:
    h = hashlib.sha256()
    h.update(f"{spec.dataset}|{tf!r}|".encode())
    for part, ds in (("bank", bank), ("query", query)):
        h.update(part.encode())
        for path, label in getattr(ds, "samples", []):
            try:
                size = os.path.getsize(path)
            except OSError:
                size = -1
            rel = os.path.relpath(path, spec.root)
            h.update(f"{rel}|{label}|{size}\n".encode())
        h.update(json.dumps(getattr(ds, "class_to_idx", {}), sort_keys=True).encode())
    return h.hexdigest()


def cache_key(weights: str, data_fingerprint: str, recipe: Recipe) -> str:
    """sha256 naming a cell's cache entry (see the module docstring)."""
    fields = {name: getattr(recipe, name) for name in FEATURE_FIELDS}
    text = json.dumps({"weights": weights, "data": data_fingerprint, "recipe": fields,
                       "code": FEATURE_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.pt"


def read_entry(path: Path) -> Optional[dict]:
    """A cache entry (``bank``, ``bank_labels``, ``query``, ``query_labels``, ``meta``), or None when absent or
    unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged entry is recomputed, not fatal
        print(f"WARNING: feature cache entry {path} is unreadable; recomputing it")
        return None
    return entry if isinstance(entry, dict) and "bank" in entry and "query" in entry else None


def write_entry(path: Path, entry: dict) -> None:
    """Atomic write of a cache entry (temporary file, fsync, rename): the one place the cache writes."""
    from util.checkpoint import save_checkpoint

    save_checkpoint(entry, path)


def mean_patch_features(model: torch.nn.Module, imgs: torch.Tensor, res: float) -> torch.Tensor:
    """Mean of the patch tokens [B, D] after the final norm of the unmasked encoder (``pooling: mean``)."""
    from util.gsd import absolute_res, as_res

    input_res = absolute_res(as_res(float(res), imgs.shape[0], imgs), getattr(model, "absolute_scale", False))
    latent = model.forward_encoder(imgs, 0.0, input_res)[0]
    return latent[:, 1:].mean(dim=1)


def _dataset_order(feats: torch.Tensor, world: int) -> torch.Tensor:
    """Rows gathered shard by shard (rank r holds r, r + W, ...) back in dataset order."""
    if world == 1:
        return feats
    n = feats.shape[0]
    order = torch.tensor([i for r in range(world) for i in range(r, n, world)], device=feats.device)
    out = torch.empty_like(feats)
    out[order] = feats
    return out


def extract(model: torch.nn.Module, data: CellData, recipe: Recipe, device: torch.device,
            num_workers: int = 0) -> dict:
    """Features of both splits at the recipe's size, in dataset order, on every rank: ``{"bank": [Nb, D],
    "bank_labels": [Nb], "query": [Nq, D], "query_labels": [Nq]}`` (float32 / int64, on the CPU)."""
    from util import dist as dist_util
    from util.amp import amp_dtype
    from util.gsd import eval_res
    from util.knn_eval import ShardSampler, cls_features, collate_images, extract_features

    res = eval_res(recipe.size, recipe.base_resolution, recipe.eval_gsd)
    feature_fn = cls_features if recipe.pooling == "cls" else mean_patch_features
    world = dist_util.get_world_size()
    out = {}
    for part, ds in (("bank", data.bank), ("query", data.query)):
        loader = DataLoader(ds, batch_size=recipe.batch_size, sampler=ShardSampler(ds), num_workers=num_workers,
                            pin_memory=device.type == "cuda", drop_last=False, collate_fn=collate_images)
        feats, labels = extract_features(model, loader, recipe.size, res, device, amp_dtype(recipe.amp),
                                         interpolation=recipe.interpolation, feature_fn=feature_fn)
        out[part] = _dataset_order(feats, world).cpu()
        out[f"{part}_labels"] = _dataset_order(labels, world).cpu()
    return out
