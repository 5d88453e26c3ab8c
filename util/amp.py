"""Mixed precision and the optimizer step shared by the pretraining and finetuning engines.

``AmpConfig`` resolves ``--amp {auto,none,fp16,bf16}`` into an autocast context and a ``torch.amp.GradScaler``
that is enabled only for fp16 (bf16 has fp32's exponent range and needs no loss scaling).
"""
from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Iterable, Optional

import torch

__all__ = ["NonFiniteLossError", "check_finite_loss", "AMP_MODES", "add_amp_arg", "AmpConfig", "amp_dtype",
           "autocast_context", "grad_norm"]

_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AMP_MODES = ("auto", "none", "fp16", "bf16")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stops without writing a checkpoint."""


def check_finite_loss(loss_mean: float, epoch: int, step: int, loss_local: Optional[float] = None,
                      where: str = "") -> None:
    """The one non-finite-loss check of the engines: raise :class:`NonFiniteLossError` naming the epoch and step
    unless ``loss_mean`` -- the loss averaged over ranks, so that every rank raises together -- is finite.
    ``loss_local`` (this rank's loss) is the value named when it is the non-finite one; ``where`` is appended to
    the step (e.g. the global step)."""
    if math.isfinite(loss_mean):
        return
    shown = loss_local if loss_local is not None and not math.isfinite(loss_local) else loss_mean
    raise NonFiniteLossError(f"loss is {shown} at epoch {epoch}, step {step}{where}; training stopped.")


def _cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16 on this CUDA device (compute capability 8.0+: Ampere, Hopper, ...), emulation not counted."""
    if not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def amp_dtype(mode: str, device: torch.device | str = "cpu") -> Optional[torch.dtype]:
    """Autocast dtype of an ``--amp`` mode (None = fp32).

    ``auto``: bf16 on a CUDA GPU with native bf16 (no loss scaling, no overflow), fp16 (+ GradScaler) on older
    GPUs (the original's choice everywhere), and fp32 on CPU (ask for ``bf16`` explicitly there).
    """
    if mode == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            mode = "bf16" if _cuda_supports_bf16(device) else "fp16"
        else:
            mode = "none"
    if mode not in _DTYPES:
        raise ValueError(f"--amp must be one of auto, none, fp16, bf16; got {mode!r}")
    return _DTYPES[mode]


def add_amp_arg(group) -> None:
    """``--amp`` (shared by the launchers; resolved by ``AmpConfig`` / ``amp_dtype``)."""
    group.add_argument("--amp", default="auto", choices=list(AMP_MODES),
                       help="mixed precision: auto = bf16 on GPUs that support it, else fp16 + GradScaler on CUDA "
                            "(the original's choice); none (fp32) on CPU; bf16 works on CPU too (default auto)")


def autocast_context(device: torch.device | str, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a null context for fp32."""
    if dtype is None:
        # not autocast(enabled=False): that would switch off an autocast region the caller is already in
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the parameters' gradients (0 when none has a gradient); gradients are not modified."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float(), 2.0).to(device) for g in grads]), 2.0)


class AmpConfig:
    """Mixed-precision settings resolved from ``--amp {auto,none,fp16,bf16}``.

    ``auto`` is bf16 on GPUs with native bf16, fp16 (the original's autocast + GradScaler) on older GPUs and none on
    CPU. bf16 needs no scaler and works on CPU too. ``scaler`` is a ``torch.amp.GradScaler``, enabled only for fp16 (a disabled one is a pass-through).
    """

    def __init__(self, mode: str, device: torch.device | str) -> None:
        device = torch.device(device)
        self.dtype = amp_dtype(mode, device)
        self.mode = {None: "none", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mode == "fp16")

    @property
    def enabled(self) -> bool:
        """Whether the loss is scaled (fp16)."""
        return self.mode == "fp16"

    def autocast(self) -> ContextManager:
        """The forward pass's autocast context (a null context for fp32)."""
        return autocast_context(self.device_type, self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      parameters: Iterable[torch.nn.Parameter], update_grad: bool = True,
                      clip_grad: Optional[float] = None) -> Optional[torch.Tensor]:
        """Scaled backward; on optimizer steps (``update_grad``) also unscale, clip (when ``clip_grad`` is not
        None), step and update the scale. Returns the gradient norm after unscaling (before clipping) on optimizer
        steps, None on accumulation-only micro-steps. Does not zero the gradients."""
        self.scaler.scale(loss).backward()
        if not update_grad:
            return None
        self.scaler.unscale_(optimizer)  # clipping and the logged norm must see the true gradients
        params = [p for p in parameters if p.grad is not None]
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = grad_norm(params)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def state_dict(self) -> dict:
        """The scaler's state (``{}`` unless fp16)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore the scaler; an empty state (a run without fp16) is ignored."""
        # loading {} into an enabled GradScaler raises, and a disabled one has nothing to restore
        if self.enabled and state:
            self.scaler.load_state_dict(state)
