"""Weighted k-nearest-neighbour classification on embedding features (the Scale-MAE kNN monitor).

Features are L2-normalised (float32), similarity is cosine, and each of the k nearest training samples votes for
its label with weight ``exp(similarity / temperature)``; the class with the largest summed vote wins (ties go to
the lowest class index). Test queries are processed in chunks so memory stays O(chunk x bank).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_predict_multi_k", "topk_accuracy", "auto_chunk_size"]

_SIM_BLOCK_BYTES = 256 * 1024 * 1024


def auto_chunk_size(bank_size: int, budget_bytes: int = _SIM_BLOCK_BYTES) -> int:
    """Number of queries whose float32 similarity block against ``bank_size`` samples fits ``budget_bytes``."""
    return max(1, budget_bytes // (4 * max(1, bank_size)))


def _check_inputs(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  num_classes: int | None) -> int:
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(f"knn: features must be 2-D (N, D); got train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn: feature widths differ: train {train_features.shape[1]} vs test "
                         f"{test_features.shape[1]}")
    if train_labels.dim() != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"knn: train_labels must be 1-D with {train_features.shape[0]} entries, "
                         f"got shape {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("knn: the training feature bank is empty")
    if train_labels.dtype.is_floating_point or train_labels.dtype == torch.bool:
        raise ValueError(f"knn: train_labels must be an integer tensor, got {train_labels.dtype}")
    lo, hi = int(train_labels.min()), int(train_labels.max())
    if lo < 0:
        raise ValueError(f"knn: train_labels must be >= 0, got minimum {lo}")
    if num_classes is None:
        return hi + 1
    if hi >= num_classes:
        raise ValueError(f"knn: train label {hi} is out of range for num_classes={num_classes}")
    return int(num_classes)


def knn_predict_multi_k(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                        ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                        num_classes: int | None = None, chunk_size: int | None = None,
                        ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Weighted kNN for several k at once; the top-``max(ks)`` neighbours are found once per chunk.

    Returns ``{k: (predictions LongTensor[N_test], class_scores FloatTensor[N_test, C])}``. Each k is clipped to the
    bank size. ``num_classes`` defaults to ``max(train_labels) + 1``. Computation happens on the device of
    ``train_features`` (results live there); ``chunk_size`` defaults to a block of about 256 MB of similarities.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"knn: every k must be >= 1, got {ks}")
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    n_classes = _check_inputs(train_features, train_labels, test_features, num_classes)
    device = train_features.device
    # cosine similarity without a normalised copy of the bank: scale each column of the similarity block instead
    bank = train_features.float()
    inv_norm = bank.norm(dim=1).clamp_min(1e-12).reciprocal()
    labels = train_labels.to(device=device, dtype=torch.long)
    n_bank, n_test = bank.shape[0], test_features.shape[0]
    k_max = min(max(ks), n_bank)
    chunk = int(chunk_size) if chunk_size else auto_chunk_size(n_bank)
    if chunk < 1:
        raise ValueError(f"knn: chunk_size must be >= 1, got {chunk_size}")

    scores = {k: torch.zeros(n_test, n_classes, device=device) for k in ks}
    # one similarity buffer for all chunks: a fresh (chunk, bank) block per chunk would be page-faulted in
    # (zero-filled by the kernel) every time on CPU, ~2 s of a 100k x 10k search
    sim_buffer = torch.empty(min(chunk, n_test), n_bank, device=device)
    for start in range(0, n_test, chunk):
        query = F.normalize(test_features[start:start + chunk].to(device).float(), dim=1)
        sim = torch.mm(query, bank.T, out=sim_buffer[:query.shape[0]]).mul_(inv_norm)  # (chunk, bank)
        top_sim, top_idx = sim.topk(k_max, dim=1, largest=True, sorted=True)
        weights = (top_sim / temperature).exp_()
        neighbour_labels = labels[top_idx]
        for k in ks:
            kk = min(k, n_bank)
            scores[k][start:start + query.shape[0]].scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
    return {k: (s.argmax(dim=1), s) for k, s in scores.items()}


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted kNN predictions and class scores; see ``knn_predict_multi_k`` (this is the single-k case)."""
    return knn_predict_multi_k(train_features, train_labels, test_features, ks=(k,), temperature=temperature,
                               num_classes=num_classes, chunk_size=chunk_size)[k]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> list[float]:
    """Top-k accuracy in percent for each k (k is clipped to the number of classes)."""
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"topk_accuracy: need scores (N, C) and labels (N,), got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples")
    ks = list(ks)
    k_max = min(max(ks), scores.shape[1])
    top = scores.topk(k_max, dim=1).indices
    hits = top.eq(labels.to(top.device).long().view(-1, 1))
    return [float(hits[:, :min(k, k_max)].any(dim=1).float().mean().item() * 100.0) for k in ks]
