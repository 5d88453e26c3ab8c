"""Multiscale kNN evaluation of a Scale-MAE encoder (``main_pretrain.py --eval_only`` and the training monitor).

Semantics are the original's: features are the cls token after the final norm of the unmasked encoder, in float32,
for images area-resized to each evaluation side; ``res`` is ``util.gsd.eval_res`` of the side; cosine similarity,
top-k neighbours, votes weighted by ``exp(sim / T)``. Unlike the original, the bank holds exactly the real samples
(no zero padding, no sampler duplicates) gathered from every rank, the feature width comes from the model, and the
search runs in chunks (``util/knn.py``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from util import dist as dist_util
from util.dist import ShardSampler  # re-exported: callers import it from here
from util.gsd import eval_res  # re-exported: callers import it from here
from util.knn import knn_predict_multi_k, topk_accuracy
from util.metrics import save_report

__all__ = ["ShardSampler", "collate_images", "eval_res", "extract_features", "knn_accuracies", "evaluate_knn",
           "format_table", "save_knn_report", "INTERPOLATIONS"]

INTERPOLATIONS = ("area", "bilinear", "bicubic", "nearest")  # resize modes of extract_features (default area)


def resize_to(imgs: torch.Tensor, scale: int, mode: str = "area") -> torch.Tensor:
    """``imgs`` [B, C, H, W] resized to ``scale`` x ``scale`` px with ``mode`` (unchanged when already that size).

    ``area`` is the original's kNN resize; ``bilinear``/``bicubic`` are antialiased (as PIL when shrinking)."""
    if imgs.shape[-2:] == (scale, scale):
        return imgs
    if mode == "area":
        return F.interpolate(imgs, size=(scale, scale), mode="area")
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(imgs, size=(scale, scale), mode=mode, align_corners=False, antialias=True)
    if mode == "nearest":
        return F.interpolate(imgs, size=(scale, scale), mode="nearest-exact")
    raise ValueError(f"interpolation {mode!r}: expected one of {', '.join(INTERPOLATIONS)}")


def cls_features(model: torch.nn.Module, imgs: torch.Tensor, res: float) -> torch.Tensor:
    """The kNN feature [B, D]: the cls token after the final norm of the unmasked encoder (``knn_feats=True``)."""
    return model(imgs, input_res=float(res), knn_feats=True)  # one res: its table is built once


def collate_images(batch: list) -> tuple:
    """Default collation, except that images of different sizes (a user's own folder) come as a list, each to be
    resized on its own, instead of failing to stack."""
    imgs = [item[0] for item in batch]
    labels = torch.as_tensor([int(item[1]) for item in batch])
    if all(img.shape == imgs[0].shape for img in imgs):
        return torch.stack(imgs), labels
    return imgs, labels


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable,
    scale: int,
    res: float,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    interpolation: str = "area",
    feature_fn: Callable[[torch.nn.Module, torch.Tensor, float], torch.Tensor] = cls_features,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN features of a whole (sharded) dataset, gathered from all ranks (rank 0's shard first, then rank 1's...).

    Batches are ``(imgs [B, C, H, W], labels [B])``, or ``(list of [C, H_i, W_i], labels)`` when the images differ
    in size (:func:`collate_images`); images are resized to ``scale`` px with ``interpolation`` (default area, the
    original's; one by one in the list case) and encoded with ``feature_fn(model, x, res)`` (default
    :func:`cls_features`: ``model(x, input_res=res, knn_feats=True)``). Returns features [N, D] (float32, on
    ``device``) and labels [N].
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for imgs, target in loader:
        if isinstance(imgs, (list, tuple)):
            imgs = torch.cat([resize_to(img.to(device)[None], scale, interpolation) for img in imgs])
        imgs = resize_to(imgs.to(device, non_blocking=True), scale, interpolation)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = feature_fn(model, imgs, res)
        feats.append(out.float())
        labels.append(torch.as_tensor(target, device=device).long())
    model.train(was_training)
    width = getattr(model, "embed_dim", None) or model.cls_token.shape[-1]
    local_feats = torch.cat(feats) if feats else torch.zeros(0, width, device=device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return dist_util.gather_tensors_variable(local_feats), dist_util.gather_tensors_variable(local_labels)


def knn_accuracies(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                   ks: Sequence[int], temperature: float, num_classes: Optional[int] = None
                   ) -> dict[int, dict[str, float]]:
    """Weighted-kNN top-1/top-5 accuracy (percent) of ``query`` [Nq, D] against ``bank`` [Nb, D] for every k:
    ``{k: {"top1": %, "top5": %}}``. The one kNN scoring of ``main_pretrain.py`` and ``main_eval.py``."""
    per_k = {}
    for k, (_, scores) in knn_predict_multi_k(bank, bank_labels, query, ks=ks, temperature=temperature,
                                               num_classes=num_classes).items():
        top1, top5 = topk_accuracy(scores, query_labels, ks=(1, 5))
        per_k[k] = {"top1": top1, "top5": top5}
    return per_k


def evaluate_knn(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    scales: Sequence[int] = (56, 112, 224),
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    base_resolution: float = 1.0,
    eval_gsd: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    num_classes: Optional[int] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict[str, Any]:
    """kNN accuracy at every evaluation side.

    Returns ``{"scales": {scale: {"res": r, "k": {k: {"top1": %, "top5": %}}}}, "mean": {k: {"top1", "top5"}},
    "bank_size": n_train, "num_queries": n_val}`` (accuracies in percent).
    """
    device = torch.device(device)

    def loader(ds: Dataset) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(ds), num_workers=num_workers,
                          pin_memory=device.type == "cuda", drop_last=False, collate_fn=collate_images)

    train_loader, val_loader = loader(train_set), loader(val_set)
    result: dict[str, Any] = {"scales": {}, "k_values": list(ks), "temperature": temperature}
    for scale in scales:
        res = eval_res(scale, base_resolution, eval_gsd)
        bank, bank_labels = extract_features(model, train_loader, scale, res, device, amp_dtype)
        query, query_labels = extract_features(model, val_loader, scale, res, device, amp_dtype)
        per_k = knn_accuracies(bank, bank_labels, query, query_labels, ks, temperature, num_classes)
        result["scales"][int(scale)] = {"res": res, "k": per_k}
        result["bank_size"], result["num_queries"] = int(bank.shape[0]), int(query.shape[0])
    result["mean"] = {
        k: {m: sum(s["k"][k][m] for s in result["scales"].values()) / len(scales) for m in ("top1", "top5")}
        for k in ks
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """Paper-style table: one row per evaluation side and a mean row, top-1/top-5 for each k."""
    ks = result["k_values"]
    header = "| scale (px) | res | " + " | ".join(f"top-1 k={k} | top-5 k={k}" for k in ks) + " |"
    rule = "|" + "---|" * (2 + 2 * len(ks))
    rows = [header, rule]
    for scale, entry in result["scales"].items():
        cells = " | ".join(f"{entry['k'][k]['top1']:.2f} | {entry['k'][k]['top5']:.2f}" for k in ks)
        rows.append(f"| {scale} | {entry['res']:.3g} | {cells} |")
    cells = " | ".join(f"{result['mean'][k]['top1']:.2f} | {result['mean'][k]['top5']:.2f}" for k in ks)
    rows.append(f"| mean | | {cells} |")
    return "\n".join(rows)


def _plot_knn(result: dict[str, Any], ax) -> None:
    """Top-1 accuracy against the evaluation side, one line per k."""
    scales = list(result["scales"])
    for k in result["k_values"]:
        ax.plot(scales, [result["scales"][s]["k"][k]["top1"] for s in scales], marker="o", label=f"top-1, k={k}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(scales, [str(s) for s in scales])
    ax.set_xlabel("evaluation image side (px)")
    ax.set_ylabel("kNN accuracy (%)")


def save_knn_report(result: dict[str, Any], output_dir: str | os.PathLike, tag: str = "knn") -> dict[str, Path]:
    """Write ``{tag}.json``, ``{tag}.md`` and an accuracy-vs-scale plot ``{tag}.png`` to ``output_dir``."""
    return save_report(result, output_dir, tag, format_table, _plot_knn)
