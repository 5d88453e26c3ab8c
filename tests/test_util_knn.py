"""Tests for util/knn.py against an explicit brute-force reference."""
from __future__ import annotations

import math

import pytest
import torch

from util.knn import auto_chunk_size, knn_predict, knn_predict_multi_k, topk_accuracy


def brute_knn(train, labels, test, k, temperature, num_classes):
    """Loop-based reference: float64, explicit normalisation, stable sort, dense per-neighbour one-hot votes."""
    train = train.double()
    test = test.double()
    bank = [row / max(row.norm().item(), 1e-12) for row in train]
    preds, all_scores = [], []
    for q in test:
        q = q / max(q.norm().item(), 1e-12)
        sims = [float((q * b).sum()) for b in bank]
        order = sorted(range(len(bank)), key=lambda j: -sims[j])[: min(k, len(bank))]
        scores = [0.0] * num_classes
        for j in order:
            one_hot = [1.0 if c == int(labels[j]) else 0.0 for c in range(num_classes)]
            for c in range(num_classes):
                scores[c] += one_hot[c] * math.exp(sims[j] / temperature)
        best = max(range(num_classes), key=lambda c: (scores[c], -c))  # ties -> lowest class index
        preds.append(best)
        all_scores.append(scores)
    return torch.tensor(preds), torch.tensor(all_scores, dtype=torch.float64)


def _data(n_train=50, n_test=23, dim=8, n_classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g) * 3.0  # unnormalised on purpose
    labels = torch.randint(0, n_classes, (n_train,), generator=g)
    test = torch.randn(n_test, dim, generator=g)
    return train, labels, test


def _assert_matches(out, ref, rtol=1e-4):
    pred, scores = out
    ref_pred, ref_scores = ref
    assert pred.dtype == torch.long and scores.dtype == torch.float32
    assert torch.equal(pred, ref_pred)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=rtol, atol=1e-6 * ref_scores.abs().max().item())


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 23, 100])  # 23 queries: 4 does not divide it
def test_matches_brute_force(chunk_size):
    train, labels, test = _data()
    out = knn_predict(train, labels, test, k=5, temperature=0.07, chunk_size=chunk_size)
    _assert_matches(out, brute_knn(train, labels, test, 5, 0.07, int(labels.max()) + 1))


def test_temperature_and_k_variants():
    train, labels, test = _data(seed=1)
    for k, t in [(1, 0.07), (20, 0.5), (50, 1.0)]:
        _assert_matches(knn_predict(train, labels, test, k=k, temperature=t, chunk_size=6),
                        brute_knn(train, labels, test, k, t, int(labels.max()) + 1))


def test_k_larger_than_bank():
    train, labels, test = _data(n_train=6, n_test=5)
    out = knn_predict(train, labels, test, k=20)
    _assert_matches(out, brute_knn(train, labels, test, 6, 0.07, int(labels.max()) + 1))


def test_num_classes_larger_than_labels_present():
    train, labels, test = _data(n_classes=4)
    pred, scores = knn_predict(train, labels, test, k=7, num_classes=10, chunk_size=5)
    assert scores.shape == (23, 10)
    assert torch.all(scores[:, 4:] == 0)
    _assert_matches((pred, scores), brute_knn(train, labels, test, 7, 0.07, 10))
    with pytest.raises(ValueError, match="out of range"):
        knn_predict(train, labels, test, num_classes=3)


def test_ties_in_neighbours_and_votes():
    # each bank vector appears three times with the same label, so k=4 cuts through a tie group;
    # any tie-breaking gives the same votes
    base, base_labels, test = _data(n_train=10, n_test=9, n_classes=3, seed=2)
    train = base.repeat(3, 1)
    labels = base_labels.repeat(3)
    _assert_matches(knn_predict(train, labels, test, k=4, chunk_size=2),
                    brute_knn(train, labels, test, 4, 0.07, int(labels.max()) + 1))
    # a vote tie between classes 2 and 1 goes to the lower index
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([2, 1, 0])
    pred, scores = knn_predict(train, labels, torch.tensor([[5.0, 0.0]]), k=2)
    assert scores[0, 1] == scores[0, 2] > 0 and scores[0, 0] == 0
    assert pred.tolist() == [1]


def test_zero_vectors_and_scale_invariance():
    train, labels, test = _data(seed=3)
    train[0] = 0.0  # zero vector: similarity 0, no NaN
    scaled = test * (torch.rand(test.shape[0], 1) * 10 + 1e-3)
    a = knn_predict(train, labels, test, k=9)
    b = knn_predict(train, labels, scaled, k=9)
    assert torch.isfinite(a[1]).all()
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-3)


def test_multi_k_matches_single_k():
    train, labels, test = _data(n_train=40, seed=4)
    multi = knn_predict_multi_k(train, labels, test, ks=(1, 10, 20, 200), chunk_size=7)
    assert sorted(multi) == [1, 10, 20, 200]
    for k, (pred, scores) in multi.items():
        single = knn_predict(train, labels, test, k=k, chunk_size=3)
        assert torch.equal(pred, single[0])
        torch.testing.assert_close(scores, single[1], rtol=1e-5, atol=1e-5)  # chunk sizes change GEMM rounding
    _assert_matches(multi[10], brute_knn(train, labels, test, 10, 0.07, int(labels.max()) + 1))


def test_auto_chunk_size_bounds_block():
    assert auto_chunk_size(1_000_000) * 1_000_000 * 4 <= 256 * 2 ** 20
    assert auto_chunk_size(1_000_000) == 256 * 2 ** 20 // 4_000_000
    assert auto_chunk_size(10 ** 12) == 1


def test_input_validation():
    train, labels, test = _data()
    with pytest.raises(ValueError, match="widths"):
        knn_predict(train, labels, test[:, :3])
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, labels[:-1], test)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, labels, test, k=0)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    labels = torch.tensor([1, 1, 0, 0])
    top1, top2, top5 = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert top1 == pytest.approx(25.0)   # only sample 0
    assert top2 == pytest.approx(75.0)   # samples 0, 1, 3 (second-best 0.3 at index 0 beats index 1 by order)
    assert top5 == pytest.approx(100.0)  # clipped to 3 classes
