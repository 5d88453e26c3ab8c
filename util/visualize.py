"""Reconstruction figures for the training monitor: input, target and the predicted bands, de-normalised."""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["reconstruction_grid", "save_reconstruction", "BackgroundFigures"]


def _to_display(img: torch.Tensor, mean: Sequence[float], std: Sequence[float], vis_factor: float) -> np.ndarray:
    """[C, H, W] normalised -> [H, W, 3] in [0, 1] (first three bands; a single band is shown in grey)."""
    c = img.shape[0]
    m = torch.as_tensor(list(mean)[:c] or [0.0] * c, dtype=img.dtype).view(-1, 1, 1)
    s = torch.as_tensor(list(std)[:c] or [1.0] * c, dtype=img.dtype).view(-1, 1, 1)
    x = img * s + m
    if x.max() > 2:  # raw digital numbers (e.g. Sentinel-2): the config's vis_factor brings them to ~[0, 1]
        x = x / vis_factor
    x = x[:3] if c >= 3 else x[:1].expand(3, -1, -1)
    return x.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _band_display(img: torch.Tensor) -> np.ndarray:
    """A zero-centred band (the high-frequency residual) stretched to [0, 1] for display."""
    x = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    scale = x.abs().max().clamp_min(1e-6)
    return (x / scale * 0.5 + 0.5).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def reconstruction_grid(
    model: torch.nn.Module,
    imgs: torch.Tensor,
    targets: torch.Tensor,
    preds: Sequence[torch.Tensor],
    mask: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    vis_factor: float = 1.0,
    max_samples: int = 4,
):
    """A matplotlib figure: per sample the masked input, the target, the high band, the low band and the combined
    prediction. ``preds`` are the model's patchified ``[pred_high, pred_low, pred_all]``; ``mask`` is [N, L]."""
    from matplotlib.figure import Figure  # not pyplot: figures can be drawn off the main thread

    n = min(max_samples, imgs.shape[0])
    imgs, targets, mask = imgs[:n].float().cpu(), targets[:n].float().cpu(), mask[:n].float().cpu()
    chans = imgs.shape[1]
    grid = int(round(mask.shape[1] ** 0.5))
    bands = []
    for pred in preds:
        pred = pred[:n].float().cpu()
        q = int(round((pred.shape[-1] / chans) ** 0.5))
        bands.append(model.unpatchify(pred, patch=q, channels=chans))
    pred_high, pred_low, pred_all = bands
    keep = 1 - mask.reshape(n, 1, grid, grid)
    keep = torch.nn.functional.interpolate(keep, size=imgs.shape[-2:], mode="nearest")
    masked = imgs * keep

    columns = [("masked input", [_to_display(x, mean, std, vis_factor) for x in masked]),
               ("target", [_to_display(x, mean, std, vis_factor) for x in targets]),
               ("pred high (band)", [_band_display(x) for x in pred_high]),
               ("pred low", [_to_display(x, mean, std, vis_factor) for x in pred_low]),
               ("pred combined", [_to_display(x, mean, std, vis_factor) for x in pred_all])]
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * n))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for col, (title, images) in enumerate(columns):
        for row in range(n):
            ax = axes[row][col]
            ax.imshow(images[row])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def save_reconstruction(fig, path: str | os.PathLike, writer=None, tag: str = "reconstruction",
                        step: Optional[int] = None) -> Path:
    """Write the figure as a PNG (and to TensorBoard when a ``SummaryWriter`` is given), then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    if writer is not None:
        writer.add_figure(tag, fig, global_step=step, close=False)
    plt.close(fig)  # a no-op for figures made without pyplot
    return path


class BackgroundFigures:
    """Run figure jobs on one background thread, so that the training step does not wait for matplotlib.

    ``submit(fn, *args)`` queues a job (waiting first for the previous one: at most one figure in flight, none
    dropped); an exception of a job is raised by the next ``submit`` or by ``close``. Use as a context manager, inside
    the block that closes the TensorBoard writer. Jobs should get host copies of the tensors they draw.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="figures")
        self._last: Optional[Future] = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._last is not None:
            self._last.result()
        self._last = self._pool.submit(fn, *args)

    def close(self) -> None:
        try:
            if self._last is not None:
                self._last.result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "BackgroundFigures":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the run is already failing (e.g. a full disk): its error is the one to report, not the figure's
            self.close()
        except Exception:  # noqa: BLE001
            pass
