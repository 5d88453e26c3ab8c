"""One pretraining epoch: warmup/cosine lr per step, AMP, gradient accumulation, logging, mid-epoch checkpoints."""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from dataloaders.seeding import sample_seed
from util import dist as dist_util
from util.amp import AmpConfig, NonFiniteLossError, check_finite_loss
from util.lr_sched import adjust_learning_rate
from util.metrics import MetricLogger, SmoothedValue

__all__ = ["NonFiniteLossError", "AmpConfig", "train_one_epoch"]


def pick_source_size(args: Any) -> Optional[int]:
    """Encoder input side for this step (``--source_size`` / ``--source_size_scheduler``); None = the input as is."""
    sizes = args.source_size
    size = int(np.random.choice(sizes)) if args.source_size_scheduler == "random" else int(sizes[0])
    return None if size == args.input_size else size


def mask_noise(args: Any, epoch: int, step: int, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """This rank's rows of the step's global masking noise [batch, L].

    The noise of the whole global batch is drawn from a generator seeded by (seed, epoch, step) and rank ``r`` takes
    rows ``r, r + w, ...`` (its samples' global positions), so the masks do not depend on the number of processes.
    """
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    gen = torch.Generator().manual_seed(sample_seed(args.seed, epoch, step))
    noise = torch.rand(batch * world, num_patches, generator=gen)[rank::world]
    return noise.to(device, non_blocking=True)


def train_one_epoch(
    model: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    amp: AmpConfig,
    args: Any,
    log_writer=None,
    start_step: int = 0,
    steps_per_epoch: Optional[int] = None,
    on_step_end: Optional[Callable[[int], None]] = None,
    on_visualize: Optional[Callable[[int, tuple], None]] = None,
    on_finite_loss: Optional[Callable[[], None]] = None,
    stop: Any = None,
) -> dict[str, float]:
    """Train for one epoch (or its remainder when resuming at ``start_step``).

    Batches are ``(imgs [N, C, H, H], input_res [N], targets [N, C, 2H, 2H], target_res [N])``.
    ``on_step_end(step)`` runs after every optimizer step (mid-epoch checkpoints); ``on_visualize(step, outputs)``
    every ``args.print_freq`` steps on rank 0; ``on_finite_loss()`` once the losses (mean over ranks) since the last
    check are known to be finite -- checks run at print steps, before every ``--save_every_steps`` save and at the
    end of the epoch, so the latest saved state produced a finite loss (``CheckpointKeeper.verify``).
    ``stop`` (a ``harness.run_control.StopRequest``, set by SIGTERM/SIGUSR1 on any rank): its flag rides on the
    flush's collective, so every rank sets ``stop.agreed`` at the same flush (single process: the flush is made at
    the signalled step); the epoch then ends after the next optimizer step, once ``on_step_end`` (which saves the
    resumable checkpoint) has run. Returns the epoch's averaged metrics. Raises ``NonFiniteLossError`` naming the
    epoch and step if the loss is not finite on any rank (all ranks raise together).
    """
    model.train(True)
    accum_iter = args.accum_iter
    steps_per_epoch = steps_per_epoch or len(data_loader)
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    tick = time.time()
    save_every = int(getattr(args, "save_every_steps", 0) or 0)
    distributed = dist_util.get_world_size() > 1
    # The step never waits for the device: losses and gradient norms stay device tensors until a flush (print
    # steps, checkpoint steps, the last step), where one copy brings them all to the host for the finiteness check,
    # the progress meters and TensorBoard (same points and values as per-step logging, written later).
    pending: list[tuple[int, bool, torch.Tensor, Optional[torch.Tensor], float, float, float]] = []

    def flush() -> None:
        if not pending:
            return
        values = torch.stack([p[2].float().reshape(()) for p in pending]
                             + [p[3].detach().float().reshape(()).to(p[2].device) for p in pending
                                if p[3] is not None]).cpu().tolist()  # the one host sync
        losses, norms = values[:len(pending)], iter(values[len(pending):])
        # one collective; every rank sees the same verdicts (finite losses, and whether any rank must stop)
        *losses_all, stop_all = dist_util.all_reduce_means(losses + [stop.flag() if stop is not None else 0.0])
        if stop_all > 0:
            stop.agreed = True
        for (step_, update_, _, norm_t, lr_, images_per_s_, res_mean_), loss_value, loss_all in zip(
                pending, losses, losses_all):
            if not math.isfinite(loss_all):
                pending.clear()
            check_finite_loss(loss_all, epoch, step_, loss_value, f" (global step {epoch * steps_per_epoch + step_})")
            norm_value = next(norms) if norm_t is not None else None
            logger.update(loss=loss_value, lr=lr_, input_res=res_mean_)
            if norm_value is not None:
                logger.update(grad_norm=norm_value)
            if update_ and log_writer is not None:
                x = int((epoch + (step_ + 1) / steps_per_epoch) * 1000)  # the original's 1000 * fractional epoch
                log_writer.add_scalar("train_loss", loss_all, x)
                log_writer.add_scalar("lr", lr_, x)
                log_writer.add_scalar("grad_norm", norm_value, x)
                log_writer.add_scalar("images_per_s", images_per_s_, x)
                log_writer.add_scalar("input_res_mean", res_mean_, x)
        pending.clear()
        # every loss since the last checkpoint save is finite (flushes precede saves): that state is good
        if on_finite_loss is not None:
            on_finite_loss()
        if log_writer is not None and device.type == "cuda":
            log_writer.add_scalar("memory_gb", torch.cuda.max_memory_allocated() / 2**30,
                                  int((epoch + (step + 1) / steps_per_epoch) * 1000))

    for local_step, batch in enumerate(logger.log_every(data_loader, args.print_freq, header,
                                                        batch_size=args.batch_size)):
        step = start_step + local_step
        if step % accum_iter == 0:
            adjust_learning_rate(optimizer, epoch + step / steps_per_epoch, args)
        res_mean = float(batch[1].mean())  # from the host copy: logging it must not sync the device
        imgs, input_res, targets, target_res = (t.to(device, non_blocking=True) for t in batch)
        update = (step + 1) % accum_iter == 0 or step + 1 == steps_per_epoch
        # DDP: only the last micro-step of an accumulation window all-reduces gradients
        sync = dist_util.no_sync(model, not update)
        source_size = pick_source_size(args)
        side = source_size or imgs.shape[-1]
        noise = mask_noise(args, epoch, step, imgs.shape[0], (side // args.patch_size) ** 2, device)
        # the predictions are only materialised for the reconstruction figure
        visualize_now = on_visualize is not None and step % args.print_freq == 0 and dist_util.is_main_process()
        with sync:
            with amp.autocast():
                out = model(imgs, targets, mask_ratio=args.mask_ratio, input_res=input_res, target_res=target_res,
                            source_size=source_size, noise=noise, loss_only=not visualize_now)
            loss, outputs = (out[0], out) if visualize_now else (out, None)
            # --clip_grad 0 means off here (the original's flag), hence ``or None``
            grad_norm = amp.backward_step(loss / accum_iter, optimizer, params, update_grad=update,
                                          clip_grad=args.clip_grad or None)
        if update:
            optimizer.zero_grad(set_to_none=True)

        lr = optimizer.param_groups[0]["lr"]
        now = time.time()
        images_per_s = imgs.shape[0] * dist_util.get_world_size() / max(now - tick, 1e-9)
        tick = now
        # a copy: under CUDA graphs (--compile_mode reduce-overhead) the next replay reuses the output's memory
        pending.append((step, update, loss.detach().clone(), grad_norm, lr, images_per_s, res_mean))
        saving = update and save_every > 0 and (step + 1) % save_every == 0
        # a stop agreed at an earlier flush (or, single process, asked for now) saves at this optimizer step
        stopping = update and stop is not None and (stop.agreed or (stop.requested and not distributed))
        if step % args.print_freq == 0 or step + 1 == steps_per_epoch or saving or stopping:
            flush()  # before any checkpoint is written: a non-finite loss must stop the run first
        if update and on_step_end is not None:
            on_step_end(step)
        if visualize_now:
            on_visualize(epoch * steps_per_epoch + step, (imgs, targets, outputs))
        if update and stop is not None and stop.agreed:
            break

    flush()
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    return logger.global_averages()
