"""One epoch of segmentation training, and the multi-scale tile evaluation (used by ``main_segment.py``).

Batches are :func:`dataloaders.segmentation.seg_collate` dicts: ``image`` [N, C, S, S], ``mask`` [N, S, S] (class ids,
``ignore_index`` where unlabelled), ``res`` [N] (the model's relative GSD), plus window metadata. The model is a
``models_seg.SegmentationModel``: ``model(image, input_res=res, return_aux=True) -> (logits, aux_logits or None)``,
both [N, K, S, S].

* Loss: cross-entropy with ``ignore_index`` (+ ``dice_weight`` x soft Dice over the classes present in the batch's
  labels, ignored pixels excluded) on the main logits, + ``aux_weight`` x cross-entropy on the auxiliary logits.
* Learning rate set at every optimizer step from the fractional epoch (``util.lr_sched.adjust_learning_rate``,
  which applies each group's ``lr_scale``: layer-wise decay on the encoder); gradient accumulation over
  ``accum_iter`` micro-batches with DDP ``no_sync`` on the non-stepping ones; AMP through ``util.amp.AmpConfig``.
* Evaluation: windows of whole tiles (``TileShardSampler``); at every scale ``f`` the window is resized to
  ``round(f * S / patch) * patch`` px, its res rescaled (``util.gsd.rescale_res``), the logits resized back to
  ``S`` and the argmax pasted into a tile-sized canvas; a tile is scored (and written) once all its windows are in,
  so every pixel counts once even where windows overlap.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from util import dist as dist_util
from util.amp import AmpConfig, autocast_context, check_finite_loss
from util.gsd import rescale_res
from util.lr_sched import adjust_learning_rate
from util.metrics import MetricLogger, SmoothedValue, end_of_update
from util.seg_metrics import SegMetricAccumulator

__all__ = ["dice_loss", "seg_loss", "train_one_epoch", "evaluate", "scale_key"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes present in ``target`` of the soft Dice (softmax probabilities vs one-hot labels);
    logits [N, K, H, W], target [N, H, W]; pixels labelled ``ignore_index`` are excluded."""
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, k - 1) * valid[:, 0], k).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum((0, 2, 3)) > 0
    return 1.0 - (dice[present].mean() if present.any() else dice.mean())


def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
             dice_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy (mean over labelled pixels) + ``dice_weight`` x :func:`dice_loss`."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    if dice_weight:
        loss = loss + dice_weight * dice_loss(logits, target, ignore_index)
    return loss


def train_one_epoch(model: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, amp: AmpConfig, args: Any, log_writer: Any = None,
                    on_finite_loss: Optional[Callable[[], None]] = None, stop: Any = None, start_step: int = 0,
                    on_step_end: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Train one epoch; returns the epoch averages ``{'loss', 'loss_main', 'loss_aux', 'lr'}``.

    ``args``: ``accum_iter, lr, min_lr, warmup_epochs, epochs, print_freq, ignore_index, dice_weight, aux_weight,
    clip_grad``. TensorBoard (rank 0): ``train/loss``, ``train/loss_aux``, ``train/lr`` at x = 1000 * epoch.
    ``on_finite_loss`` is called once each step's loss (mean over ranks) is known to be finite (checkpoint
    verification hook); a non-finite one raises ``NonFiniteLossError`` on every rank. ``stop``
    (``harness.run_control.StopRequest``): its flag rides on the per-step loss all-reduce; once any rank was signalled,
    every rank sets ``stop.agreed`` and the epoch ends after that optimizer step, once ``on_step_end(step)``
    (called after every optimizer step: the launcher's mid-epoch saves) has run. ``start_step``: resuming
    mid-epoch, ``data_loader`` yields the epoch's batches from that step on (the lr schedule and the step numbers
    count the whole epoch).
    """
    model.train(True)
    accum = max(1, int(getattr(args, "accum_iter", 1) or 1))
    ignore, dice_w, aux_w = int(args.ignore_index), float(args.dice_weight), float(args.aux_weight)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    num_steps = start_step + len(data_loader)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    for local_step, batch in enumerate(metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]",
                                                               batch_size=getattr(args, "batch_size", None))):
        step = start_step + local_step
        if step % accum == 0:
            adjust_learning_rate(optimizer, step / num_steps + epoch, args)
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True)
        res = batch["res"].to(device, non_blocking=True)
        update = (step + 1) % accum == 0 or step + 1 == num_steps
        with dist_util.no_sync(model, not update):
            with amp.autocast():
                logits, aux = model(images, input_res=res, return_aux=True)
            loss_main = seg_loss(logits, target, ignore, dice_w)
            loss_aux = F.cross_entropy(aux.float(), target, ignore_index=ignore) if aux is not None and aux_w else None
            loss = loss_main + aux_w * loss_aux if loss_aux is not None else loss_main
            loss_value = float(loss.item())
            # every rank: one collective, which also tells every rank whether any rank was asked to stop
            loss_reduced, stop_all = dist_util.all_reduce_means([loss_value, stop.flag() if stop else 0.0])
            if stop_all > 0:
                stop.agreed = True
            check_finite_loss(loss_reduced, epoch, step, loss_value)  # all ranks together
            if on_finite_loss is not None:
                on_finite_loss()
            amp.backward_step(loss / accum, optimizer, params, update_grad=update, clip_grad=args.clip_grad)
        if update:
            optimizer.zero_grad(set_to_none=True)
        lr = max(g["lr"] for g in optimizer.param_groups)
        aux_value = float(loss_aux.item()) if loss_aux is not None else 0.0
        metric_logger.update(loss=loss_value, loss_main=float(loss_main.item()), loss_aux=aux_value, lr=lr)
        if update and end_of_update(log_writer, epoch, step, num_steps,
                                    {"loss": loss_reduced, "loss_aux": aux_value, "lr": lr}, on_step_end, stop):
            break
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger, flush=True)
    return {k: metric_logger.meters[k].global_avg for k in ("loss", "loss_main", "loss_aux")} | {
        "lr": metric_logger.meters["lr"].value}


def scale_key(scale: float) -> str:
    """Name of an evaluation scale in the results (``"0.5"``, ``"1"``)."""
    return f"{scale:g}"


def _scaled_side(side: int, scale: float, patch: int) -> int:
    """Side of a window of ``side`` px at ``scale``: a multiple of the patch, at least 2 patches (the pyramid's
    coarsest level halves the patch grid)."""
    return max(2 * patch, int(round(side * scale / patch)) * patch)


@torch.no_grad()
def evaluate(model: nn.Module, data_loader: Iterable, device: torch.device, scales: Sequence[float],
             class_names: Sequence[str], ignore_index: int = 255, amp_dtype: Optional[torch.dtype] = None,
             object_class: Optional[int] = None, writer: Any = None, patch_size: int = 16,
             print_freq: int = 20) -> dict[str, Any]:
    """Segment every validation tile at each of ``scales``; returns ``{"classes", "f1_class", "scales": {key:
    metrics + input_px + res_factor}, "mean": {"miou", "pixel_acc"}}`` over all ranks.

    ``data_loader`` iterates a ``SegmentationDataset`` through a ``TileShardSampler`` (whole tiles per rank, in
    order). ``writer`` (``util.seg_outputs.PredictionWriter``) receives each finished tile's prediction at the first
    scale. ``object_class``: class id whose object F1 is computed (None: skipped).
    """
    model.eval()
    dataset = data_loader.dataset  # type: ignore[attr-defined]
    shapes = dataset.source.shapes
    expected = Counter(dataset.windows[i].tile for i in data_loader.sampler)  # type: ignore[attr-defined]
    acc = {s: SegMetricAccumulator(class_names, ignore_index, object_class) for s in scales}
    canvases: dict[int, dict[str, Any]] = {}
    seen: Counter = Counter()
    sides: dict[float, int] = {}
    metric_logger = MetricLogger(delimiter="  ")
    for batch in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = batch["image"].to(device, non_blocking=True)
        res = batch["res"].to(device, non_blocking=True)
        side = images.shape[-1]
        preds = {}
        for s in scales:
            px = _scaled_side(side, s, patch_size)
            sides[s] = px
            x = images if px == side else F.interpolate(images, size=(px, px), mode="bilinear", align_corners=False,
                                                        antialias=True)
            with autocast_context(device, amp_dtype):
                logits = model(x, input_res=rescale_res(res, side, px))
            logits = logits.float()
            if px != side:
                logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
            preds[s] = logits.argmax(1).to(torch.uint8).cpu()
        for i, tile in enumerate(batch["tile"]):
            r, c, h, w = batch["row"][i], batch["col"][i], batch["height"][i], batch["width"][i]
            canvas = canvases.get(tile)
            if canvas is None:
                th, tw = shapes[tile]
                canvas = {"label": np.full((th, tw), ignore_index, dtype=np.uint8),
                          "pred": {s: np.zeros((th, tw), dtype=np.uint8) for s in scales},
                          "image": (np.zeros((min(3, images.shape[1]), th, tw), dtype=np.float32)
                                    if writer is not None and writer.overlays else None)}
                canvases[tile] = canvas
            canvas["label"][r:r + h, c:c + w] = batch["mask"][i, :h, :w].numpy()
            for s in scales:
                canvas["pred"][s][r:r + h, c:c + w] = preds[s][i, :h, :w].numpy()
            if canvas["image"] is not None:
                canvas["image"][:, r:r + h, c:c + w] = batch["image"][i, :canvas["image"].shape[0], :h, :w].numpy()
            seen[tile] += 1
            if seen[tile] == expected[tile]:
                done = canvases.pop(tile)
                label = torch.from_numpy(done["label"])
                for s in scales:
                    acc[s].update(torch.from_numpy(done["pred"][s]), label)
                if writer is not None:
                    writer.write(tile, done["pred"][scales[0]], done["label"], done["image"])
    if canvases:
        raise RuntimeError(f"evaluation ended with unfinished tiles {sorted(canvases)} (sampler/window mismatch)")
    result: dict[str, Any] = {"classes": list(class_names),
                              "f1_class": class_names[object_class if object_class is not None else 1],
                              "scales": {}}
    for s in scales:
        stats = acc[s].compute()
        stats["input_px"] = sides.get(s, 0)
        stats["res_factor"] = dataset.size / sides[s] if sides.get(s) else float("nan")
        result["scales"][scale_key(s)] = stats
    rows = list(result["scales"].values())
    result["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in ("miou", "pixel_acc")}
    for key, r in result["scales"].items():
        extra = f" object F1 {r['object_f1']:.2f}" if "object_f1" in r else ""
        print(f"* scale {key} ({r['input_px']} px): mIoU {r['miou']:.2f} pixel acc {r['pixel_acc']:.2f} "
              f"IoU {', '.join(f'{c} {v:.2f}' for c, v in r['iou'].items())}{extra}", flush=True)
    return result
