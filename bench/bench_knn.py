"""kNN classification cost: ``util.knn.knn_predict`` on random features, time and extra resident memory.

Run in a fresh process per method: the extra memory is ``ru_maxrss`` after the call(s) minus the RSS once the bank
and queries exist. ``seconds`` is the median over the ``repeats`` calls during which other processes used < 10 % of
the CPUs, else the fastest call. Methods:

* ``ours``: ``util.knn.knn_predict`` (chunked over queries);
* ``naive``: the straightforward version -- normalise, the whole (queries x bank) similarity matrix at once,
  top-k, weighted votes (the comparison point; full suite only, it needs queries x bank x 4 bytes);
* ``bf16_probe``: not a project function -- the same chunked search with the similarity matmul in bfloat16,
  measured only to show what a reduced-precision option would give (time, agreement with fp32).
"""
from __future__ import annotations

import statistics
import time

import bench_utils  # noqa: F401
from bench_utils import GIB, OtherLoad, current_rss, peak_rss, wait_for_idle


def _data(bank: int, queries: int, dim: int, classes: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    train = torch.randn(bank, dim, generator=g)
    labels = torch.randint(0, classes, (bank,), generator=g)
    test = torch.randn(queries, dim, generator=g)
    return train, labels, test


def _naive(train, labels, test, k: int, temperature: float, num_classes: int):
    import torch
    import torch.nn.functional as F

    bank = F.normalize(train, dim=1)
    query = F.normalize(test, dim=1)
    sim = query @ bank.T
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    one_hot = torch.zeros(test.shape[0] * k, num_classes)
    one_hot.scatter_(1, labels[top_idx].view(-1, 1), 1)
    scores = (one_hot.view(test.shape[0], k, num_classes) * weights.unsqueeze(-1)).sum(1)
    return scores.argmax(1), scores


def _bf16_probe(train, labels, test, k: int, temperature: float, num_classes: int, chunk: int = 256):
    import torch
    import torch.nn.functional as F

    bank = F.normalize(train, dim=1).to(torch.bfloat16)
    scores = torch.zeros(test.shape[0], num_classes)
    for s in range(0, test.shape[0], chunk):
        q = F.normalize(test[s:s + chunk], dim=1).to(torch.bfloat16)
        top_sim, top_idx = (q @ bank.T).topk(k, dim=1)
        scores[s:s + chunk].scatter_add_(1, labels[top_idx], (top_sim.float() / temperature).exp())
    return scores.argmax(1), scores


def run(method: str = "ours", bank: int = 20000, queries: int = 2000, dim: int = 1024, k: int = 20,
        classes: int = 100, temperature: float = 0.07, seed: int = 0, compare_fp32: bool = False,
        repeats: int = 1) -> dict:
    import torch

    from util.knn import auto_chunk_size, knn_predict

    train, labels, test = _data(bank, queries, dim, classes, seed)
    fns = {"ours": lambda: knn_predict(train, labels, test, k=k, temperature=temperature, num_classes=classes),
           "naive": lambda: _naive(train, labels, test, k, temperature, classes),
           "bf16_probe": lambda: _bf16_probe(train, labels, test, k, temperature, classes)}
    if method not in fns:
        raise ValueError(f"unknown kNN method {method!r}")
    rss_before = current_rss()
    peak_before = peak_rss()
    runs = []
    for _ in range(max(1, repeats)):
        wait_for_idle()
        meter = OtherLoad().start()
        t0 = time.perf_counter()
        pred, _ = fns[method]()
        runs.append({"seconds": round(time.perf_counter() - t0, 3), "other_load": meter.stop()})
    peak_after = peak_rss()
    clean = [r["seconds"] for r in runs if r["other_load"] is not None and r["other_load"] < 0.10]
    seconds = statistics.median(clean) if clean else min(r["seconds"] for r in runs)
    out = {"method": method, "bank": bank, "queries": queries, "dim": dim, "k": k, "classes": classes,
           "seconds": seconds, "queries_per_s": queries / seconds, "runs": runs, "clean_runs": len(clean),
           "extra_rss_gib": max(0, peak_after - rss_before) / GIB,
           "peak_hidden_by_setup": peak_before > rss_before and peak_after == peak_before,
           "features_gib": (train.numel() + test.numel()) * 4 / GIB}
    if method == "ours":
        out["chunk_size"] = auto_chunk_size(bank)
    if compare_fp32 and method != "ours":
        ref, _ = knn_predict(train, labels, test, k=k, temperature=temperature, num_classes=classes)
        out["prediction_agreement_with_ours"] = float((ref == pred).float().mean())
    return out
