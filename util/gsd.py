"""The ``res`` rules: every relative GSD given to the positional embedding is computed here (one home per formula).

``res`` is a *relative* ground sample distance: it multiplies the integer patch-grid positions inside the 2-D
sin-cos positional embedding (``util/pos_embed.py``), so ``res = 1`` is plain MAE and ``2`` means "each pixel covers
twice the ground". It is not metres. Who uses which rule:

==========================================  ==============================  ===================================
rule                                        function                        used by
==========================================  ==============================  ===================================
random resized crop -> (input, target) res  :func:`crop_res_pair`           pretraining transforms (CPU, GPU)
random resized crop -> res                  :func:`crop_res`                linear-probe training transform and
                                                                            its train-range report
window shown at another pixel size -> res   :func:`window_res`              segmentation datasets
evaluation side -> res                      :func:`eval_res`                kNN evaluation, linear-probe val
ground GSD against ``reference_gsd``        :func:`relative_res`,           GeoTIFF reader (``sample['res']``),
                                            :func:`reference_gsd_factor`    GeoTIFF pretraining, segmentation
image resized from one side to another      :func:`rescale_res`             ``models_mae`` ``source_size``,
                                                                            segmentation evaluation scales
per-sample res as a tensor                  :func:`as_res`                  ``models_mae``, ``models_vit``
``absolute_scale``                          :func:`absolute_res`            ``models_mae``
==========================================  ==============================  ===================================

Every function keeps the order of operations of the code it replaced, so the values are bit-identical (floats
round differently for ``a * b / c`` and ``a * (b / c)``; each docstring states its order).

Why segmentation has no ``- 1``. The pretraining crop rule ``(side - 1) / T`` is the original's: kornia measures a
crop box between its *inclusive* corner pixels, so a crop of ``side`` pixels spans ``side - 1`` pixel steps, and the
released weights were trained with it (kept for fidelity). Segmentation is not in the original; its windows are
resized as whole images, for which the pixel ratio ``window_px / input_px`` is the exact change of pixel size (a
window shown at its own size gets ``base_resolution``, not ``base_resolution * (side - 1) / side``). The two rules
therefore stay two named functions (:func:`crop_res` and :func:`window_res`); they differ by ``base_resolution /
size`` (under 0.5 % at 224 px).

This module imports only ``torch``: no models, no data loaders.
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar, Union

import torch

__all__ = ["ResLike", "crop_res", "crop_res_pair", "window_res", "eval_res", "relative_res", "reference_gsd_factor",
           "rescale_res", "as_res", "absolute_res"]

ResLike = Optional[Union[torch.Tensor, Sequence[float], float]]
Num = TypeVar("Num", float, torch.Tensor)


def crop_res(side: int, size: int, base_resolution: float) -> float:
    """Res of a square crop of ``side`` source pixels resized to ``size`` pixels (the original's crop rule).

    ``res = (side - 1) / size * base_resolution`` -- kornia's inclusive box corners (see the module docstring).
    Pretraining uses ``size = T`` (the target side), the linear-probe transform ``size = input_size``.
    """
    return (side - 1) / size * base_resolution


def crop_res_pair(side: int, target_size: int, input_size: int, base_resolution: float) -> tuple[float, float]:
    """``(input_res, target_res)`` of a pretraining crop of ``side`` pixels resized to the target side ``T`` and then
    to ``input_size``.

    ``target_res = crop_res(side, T, base_resolution) = (side - 1) / T * base_resolution`` and
    ``input_res = target_res * T / input_size`` (in this order, as the original), both Python floats (float64).
    """
    target_res = crop_res(side, target_size, base_resolution)
    return target_res * target_size / input_size, target_res


def window_res(window_px: int, input_px: int, base_resolution: float) -> float:
    """Res of a window of ``window_px`` pixels shown to the model at ``input_px`` pixels (segmentation's rule).

    ``res = base_resolution * window_px / input_px`` (in this order): the exact change of pixel size, without the
    crop rule's ``- 1`` (why: module docstring). Multiply by :func:`reference_gsd_factor` for real ground GSDs.
    """
    return base_resolution * window_px / input_px


def eval_res(scale: int, base_resolution: float = 1.0, eval_gsd: bool = False, reference: float = 224) -> float:
    """Res of evaluation images resized to ``scale`` pixels (kNN ``--eval_scale``, linear-probe validation).

    ``base_resolution * reference / scale`` with ``eval_gsd`` (a smaller image of the same ground has a larger GSD;
    ``reference`` is the side at which the res is ``base_resolution``: 224, or ``--eval_reference_resolution``),
    else ``base_resolution`` for every scale (the original's default).
    """
    return base_resolution * reference / scale if eval_gsd else base_resolution


def relative_res(gsd: Num, reference_gsd: float) -> Num:
    """Res of a ground sample distance: ``gsd / reference_gsd`` (both metres; floats or tensors).

    ``reference_gsd`` is the GSD that maps to res 1 (e.g. 0.6 for NAIP, 10 for Sentinel-2 10 m bands);
    ``ValueError`` unless it is a positive number.
    """
    if reference_gsd is None or float(reference_gsd) <= 0:
        raise ValueError(f"reference_gsd must be a positive number of metres, got {reference_gsd!r}")
    return gsd / float(reference_gsd)


def reference_gsd_factor(gsd: Optional[float], reference_gsd: Optional[float]) -> float:
    """The factor a crop- or window-derived res is multiplied by for a window of ground ``gsd`` metres:
    ``float(relative_res(gsd, reference_gsd))``, or ``1.0`` without ``reference_gsd`` (None or 0: the original
    NAIP/Sentinel-2 behaviour, which ignored the real GSD) or when the GSD is unknown (``gsd`` None: image files
    without georeferencing). Multiplying by the factor 1.0 leaves a value bit-identical."""
    if not reference_gsd or gsd is None:
        return 1.0
    return float(relative_res(gsd, reference_gsd))


def rescale_res(res: Num, from_px: float, to_px: float) -> Num:
    """Res of an image of ``from_px`` pixels resized to ``to_px`` pixels (same ground, other pixel size).

    ``res * (from_px / to_px)`` (in this order; floats or tensors): halving the side doubles the res.
    """
    return res * (from_px / to_px)


def as_res(res: ResLike, n: int, like: torch.Tensor) -> torch.Tensor:
    """Res as a float tensor on ``like``'s device: ``[n]`` per sample, or ``[1]`` when one value (a number, a 0-d
    tensor, or None = 1) is shared by the batch, so the embedding tables are computed once and broadcast.

    ``ValueError`` when the number of values is neither 1 nor ``n``.
    """
    if res is None:
        return torch.ones(1, device=like.device)
    res = torch.as_tensor(res, device=like.device)
    if not res.is_floating_point():
        res = res.float()
    res = res.reshape(-1)
    if res.shape[0] not in (1, n):
        raise ValueError(f"res must have one value per sample: got {res.shape[0]} values for a batch of {n}")
    return res


def absolute_res(res: torch.Tensor, absolute_scale: bool) -> torch.Tensor:
    """The res the model uses: ``res``, or ones of its shape with ``absolute_scale`` (``--absolute_scale``: plain
    MAE positional embedding, the GSD ignored)."""
    return torch.ones_like(res) if absolute_scale else res
