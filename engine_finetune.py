"""One epoch of linear-probe / finetune training, and evaluation (used by ``main_linprobe.py``).

Batches: training ``(imgs [N, C, S, S], input_res [N], labels [N])``; evaluation ``(imgs, labels)`` with the
per-sample ``input_res`` supplied by the caller (``eval_res``). The model is called as
``model(imgs, input_res=input_res)`` and returns logits ``[N, num_classes]``.

* Learning rate: set at every optimizer step (accumulation boundary) from the fractional epoch
  ``epoch + step / len(loader)`` by ``util.lr_sched.adjust_learning_rate`` (per-iteration warmup + cosine).
* Gradient accumulation over ``args.accum_iter`` micro-batches; the loss is divided by ``accum_iter``; under DDP the
  gradient all-reduce is skipped (``no_sync``) on the micro-steps that do not step the optimizer.
* Mixed precision: ``amp`` (``util.amp.AmpConfig``) float16 (autocast + ``GradScaler``) or bfloat16 (autocast
  only) or none (fp32); ``evaluate`` takes the autocast dtype (``amp.dtype``).
* Evaluation sums correct-prediction counts, loss sums and sample counts over all ranks (no averages of averages);
  the caller's sampler must not duplicate samples (``util.dist.ShardSampler``).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from util import dist as dist_util
from util.amp import AmpConfig, NonFiniteLossError, autocast_context, check_finite_loss
from util.lr_sched import adjust_learning_rate
from util.metrics import MetricLogger, SmoothedValue, end_of_update

__all__ = ["AmpConfig", "NonFiniteLossError", "train_one_epoch", "evaluate", "autocast_context"]


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, amp: AmpConfig, args: Any,
                    log_writer: Any = None, max_norm: Optional[float] = None,
                    on_finite_loss: Optional[Any] = None, stop: Any = None, start_step: int = 0,
                    on_step_end: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Train ``model`` for one epoch; returns the epoch averages ``{'loss', 'lr'}`` (loss averaged over ranks).

    ``args`` provides ``accum_iter``, ``lr``, ``min_lr``, ``warmup_epochs``, ``epochs`` and ``print_freq``.
    TensorBoard (``log_writer``, rank 0): ``train/loss`` (mean over ranks) and ``train/lr`` at
    x = ``int(1000 * fractional epoch)``, at every optimizer step. ``on_finite_loss()`` is called once each step's
    loss (mean over ranks) is known to be finite; a non-finite one raises ``NonFiniteLossError`` on every rank.
    ``stop`` (``harness.run_control.StopRequest``): its flag rides on the per-step loss all-reduce; once any rank was
    signalled, every rank sets ``stop.agreed`` and the epoch ends after that optimizer step, once
    ``on_step_end(step)`` (called after every optimizer step: the launcher's mid-epoch saves) has run.
    ``start_step``: resuming mid-epoch, ``data_loader`` yields the epoch's batches from that step on (the lr
    schedule and the step numbers count the whole epoch).
    """
    model.train(True)
    accum_iter = max(1, int(getattr(args, "accum_iter", 1) or 1))
    print_freq = int(getattr(args, "print_freq", 20) or 20)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    num_steps = start_step + len(data_loader)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer.zero_grad(set_to_none=True)
    for local_step, (samples, input_res, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, header, batch_size=getattr(args, "batch_size", None))):
        step = start_step + local_step
        if step % accum_iter == 0:
            adjust_learning_rate(optimizer, step / num_steps + epoch, args)

        samples = samples.to(device, non_blocking=True)
        input_res = input_res.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        update = (step + 1) % accum_iter == 0 or step + 1 == num_steps

        with dist_util.no_sync(model, not update):
            with amp.autocast():
                outputs = model(samples, input_res=input_res)
                loss = criterion(outputs.float(), targets)
            loss_value = float(loss.item())
            loss_reduced, stop_all = dist_util.all_reduce_means([loss_value, stop.flag() if stop else 0.0])
            if stop_all > 0:
                stop.agreed = True
            check_finite_loss(loss_reduced, epoch, step, loss_value)
            if on_finite_loss is not None:
                on_finite_loss()
            amp.backward_step(loss / accum_iter, optimizer, params, update_grad=update, clip_grad=max_norm)
        if update:
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.synchronize()

        lr = max(group["lr"] for group in optimizer.param_groups)
        metric_logger.update(loss=loss_value, lr=lr)
        if update and end_of_update(log_writer, epoch, step, num_steps, {"loss": loss_reduced, "lr": lr},
                                    on_step_end, stop):
            break

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger, flush=True)
    return {"loss": metric_logger.meters["loss"].global_avg, "lr": metric_logger.meters["lr"].value}


def _all_ranks_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64 [K], CPU) summed over all ranks (a collective)."""
    t = values.to(dist_util.comm_device(), copy=True)  # never the caller's tensor (CPU: .to is a no-op)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device, eval_res: float,
             amp_dtype: Optional[torch.dtype] = None, print_freq: int = 20,
             topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy on ``data_loader``, over all ranks.

    Correct counts, loss sums and sample counts are summed across ranks before dividing, so the result is the exact
    accuracy over the union of the ranks' samples. ``k`` is clipped to the number of classes (top-5 of a 4-class
    problem is 100 %). Returns ``{'acc1', 'acc5', 'loss', 'n'}``.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(2 + len(topk), dtype=torch.float64)  # [loss_sum, n, correct@k...]
    distributed = dist_util.is_dist_avail_and_initialized()
    iterator = iter(data_loader)
    steps = len(data_loader)  # type: ignore[arg-type]
    if distributed:  # shards may differ by a batch: every rank runs the longest count (one collective)
        t = torch.tensor([steps], dtype=torch.int64, device=dist_util.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        steps = int(t.item())
    print_freq = max(1, int(print_freq))
    width = len(str(steps))
    start = time.time()
    seen = sums
    for step in range(steps):
        batch = next(iterator, None)
        if batch is not None:
            samples, targets = batch
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            res = torch.full((samples.shape[0],), float(eval_res), device=device)
            with autocast_context(device, amp_dtype):
                output = model(samples, input_res=res)
            output = output.float()
            loss_sum = criterion(output, targets)
            kmax = min(max(topk), output.shape[1])
            pred = output.topk(kmax, dim=1).indices
            hits = pred.eq(targets.view(-1, 1))
            row = [float(loss_sum.item()), float(samples.shape[0])]
            row += [float(hits[:, :min(k, kmax)].any(dim=1).sum().item()) for k in topk]
            sums += torch.tensor(row, dtype=torch.float64)
        if step % print_freq == 0 or step == steps - 1:
            # the running totals of all ranks, reduced only here (a progress line), never per step
            seen = _all_ranks_sum(sums) if distributed else sums
            n = max(float(seen[1].item()), 1.0)
            print(f"Test: [{step:>{width}}/{steps}]  acc1 {100.0 * float(seen[2].item()) / n:.2f}  "
                  f"loss {float(seen[0].item()) / n:.4f}  ({int(seen[1].item())} images so far, all ranks)  "
                  f"time: {(time.time() - start) / (step + 1):.4f} s/it", flush=True)

    if distributed:
        sums = seen if steps else _all_ranks_sum(sums)  # the last progress line already summed every rank
    total = float(sums[1].item())
    if total == 0:
        raise RuntimeError("evaluation set is empty: no samples reached evaluate()")
    stats = {"loss": float(sums[0].item()) / total, "n": int(total)}
    for i, k in enumerate(topk):
        stats[f"acc{k}"] = 100.0 * float(sums[2 + i].item()) / total
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats.get('acc5', float('nan')):.3f} loss {stats['loss']:.4f} "
          f"({stats['n']} images)", flush=True)
    return stats
