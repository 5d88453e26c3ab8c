"""Normalisation statistics (mean, std) of the datasets the data layer knows, on [0, 1] pixels."""
from __future__ import annotations

from typing import Dict, Tuple

Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The nine kNN / linear-probe evaluation datasets of the original (original_behaviour.md §4.2).
EVAL_STATS: Dict[str, Stats] = {
    "resisc": ((0.368, 0.381, 0.3436), (0.2035, 0.1854, 0.1849)),
    "mlrsnet": ((0.4002, 0.4116, 0.3874), (0.2107, 0.1915, 0.1940)),
    "airound": ((0.4015, 0.4149, 0.3817), (0.2340, 0.2096, 0.2124)),
    "cvbrct": ((0.4524, 0.4433, 0.4301), (0.2398, 0.2199, 0.2090)),
    "eurosat": ((0.3444, 0.3803, 0.4078), (0.2037, 0.1366, 0.1148)),
    "optimal-31": ((0.3688, 0.3808, 0.3378), (0.2013, 0.1806, 0.1776)),
    "whu-rs19": ((0.4265, 0.4483, 0.4026), (0.2420, 0.2188, 0.2289)),
    "ucmerced": ((0.4842, 0.4901, 0.4505), (0.2180, 0.2021, 0.1958)),
    "fmow": (IMAGENET_MEAN, IMAGENET_STD),
}

#: Per-channel statistics of the synthetic demo scenes (4 classes x 256 images of 96 px, seed 0).
DEMO_MEAN = (0.4656, 0.4002, 0.3951)
DEMO_STD = (0.1974, 0.2090, 0.1965)
