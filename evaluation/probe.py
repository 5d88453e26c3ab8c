"""Logistic-regression probe on frozen features (scikit-learn) and bootstrap confidence intervals.

The probe is ``make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))`` (lbfgs, multinomial):
C is chosen on a seeded hold-out of the training features (``dataloaders.scenes.random_split_indices``), the chosen
probe is refit on all training features and scored once on the test features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["make_probe", "holdout_split", "select_C", "probe_accuracy", "bootstrap_ci"]


def make_probe(C: float, max_iter: int = 1000):
    """The probe estimator: standardised features, multinomial logistic regression with inverse L2 strength C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=float(C), max_iter=int(max_iter)))


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[list, list]:
    """Indices (fit, validation) of ``n`` training rows: the project's seeded split."""
    from dataloaders.scenes import random_split_indices

    return random_split_indices(n, val_fraction, seed)


def select_C(x: torch.Tensor, y: torch.Tensor, grid: Sequence[float], val_fraction: float, seed: int,
             max_iter: int = 1000) -> tuple[float, dict]:
    """Pick C on a hold-out of the training features ``x`` [N, D], ``y`` [N]: ``(best C, {C: val accuracy %})``;
    ties go to the smaller C (stronger regularisation)."""
    x, y = _np(x), _np(y)
    fit_idx, val_idx = holdout_split(len(y), val_fraction, seed)
    scores = {}
    for c in grid:
        model = make_probe(c, max_iter).fit(x[fit_idx], y[fit_idx])
        scores[float(c)] = float((model.predict(x[val_idx]) == y[val_idx]).mean() * 100.0)
    best = max(sorted(scores), key=lambda c: (scores[c], -c))
    return best, scores


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   C: float, max_iter: int = 1000) -> tuple[float, np.ndarray]:
    """Fit the probe with ``C`` on all training features, score the test features: ``(accuracy %, correct [Nq])``."""
    model = make_probe(C, max_iter).fit(_np(train_x), _np(train_y))
    correct = model.predict(_np(test_x)) == _np(test_y)
    return float(correct.mean() * 100.0), correct


def bootstrap_ci(correct: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval (percent) of the accuracy of per-sample hits ``correct`` [N] (bool)."""
    correct = np.asarray(correct, dtype=np.float64)
    if resamples <= 0 or correct.size == 0:
        acc = float(correct.mean() * 100.0) if correct.size else float("nan")
        return acc, acc
    rng = np.random.default_rng(seed)
    accs = correct[rng.integers(0, correct.size, size=(int(resamples), correct.size))].mean(axis=1) * 100.0
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(accs, alpha)), float(np.quantile(accs, 1.0 - alpha))
