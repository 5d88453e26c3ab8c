"""Speed options shared by the launchers: the decoder implementation and ``torch.compile`` with an eager fallback
that names the real error.

The launchers call these functions and nothing else (the fused AdamW lives in ``harness.build_optimizer``):

* ``apply_model_options(model, args, device)``: the decoder implementation (``--fast_decoder auto|on|off``: the
  channels-last path of ``layers/fast_decoder.py`` on CPU, the reference NCHW modules elsewhere) and the gradient
  checkpointing scope (``--grad_checkpointing [all|heads]``);
* ``maybe_compile(model, args)``: ``torch.compile(model, mode=--compile_mode)`` when ``--compile``, wrapped so that a
  compiler failure at a call falls back to eager with one warning line naming the error (a genuine error of the
  model itself, which eager raises too, propagates unchanged).
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["COMPILE_MODES", "add_compile_args", "use_fast_decoder", "apply_model_options", "maybe_compile",
           "CompiledWithFallback"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_compile_args(group: argparse._ArgumentGroup) -> None:
    """``--compile`` and ``--compile_mode`` (shared by the launchers)."""
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (a compiler failure falls back to eager with a warning)")
    group.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                       help="torch.compile mode (default default); reduce-overhead / max-autotune use CUDA graphs on GPU "
                            "(static shapes: keep --batch_size and --source_size fixed)")


def use_fast_decoder(mode: Optional[str], device: torch.device | str) -> bool:
    """Whether ``--fast_decoder mode`` means the channels-last decoder on ``device`` (auto: on CPU only)."""
    mode = mode or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--fast_decoder must be auto, on or off; got {mode!r}")
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cpu")


def apply_model_options(model: nn.Module, args: Any, device: torch.device | str) -> None:
    """Decoder implementation and gradient-checkpointing scope of a pretraining model, from the launcher's args."""
    if hasattr(model, "set_fast_decoder"):
        model.set_fast_decoder(use_fast_decoder(getattr(args, "fast_decoder", None), device))
    scope = getattr(args, "grad_checkpointing", None)
    if scope:
        model.set_grad_checkpointing(True, scope="all" if scope is True else scope)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:300]


def _error_line(err: BaseException) -> str:
    """``Type: first line`` of the innermost cause (dynamo wraps a backend's error in BackendCompilerFailed and
    several lines of advice), preceded by the wrapper's type when there is one."""
    root, seen = err, {id(err)}
    while True:
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        root = inner
    text = f"{type(root).__name__}: {_first_line(root)}"
    return text if root is err else f"{type(err).__name__} <- {text}"


class CompiledWithFallback(nn.Module):
    """Calls ``torch.compile(module)``; when that raises and the eager module succeeds on the same call, prints one
    warning naming the compiler's error and runs eager from then on. When eager raises too, the error is the
    model's own and propagates as it would without ``--compile``.

    Attribute reads fall through to the wrapped module (``embed_dim``, ``cls_token``, ...); ``state_dict`` keys get
    a ``module.`` prefix, so save the unwrapped module (the launchers' ``model_without_ddp``).
    """

    def __init__(self, module: nn.Module, mode: str = "default", **compile_kwargs: Any) -> None:
        super().__init__()
        self.module = module
        self.mode = mode
        # not a registered submodule: parameters and state_dict are the eager module's, once
        if "backend" not in compile_kwargs:
            compile_kwargs["mode"] = mode  # modes are inductor's
        self.__dict__["compiled"] = torch.compile(module, **compile_kwargs)
        self.failed: Optional[str] = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return self.module(*args, **kwargs)
        if self.mode in ("reduce-overhead", "max-autotune"):
            # CUDA graphs: each call is a new step, whose outputs may overwrite the previous replay's
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - decided below: compiler failure or the model's own error
            out = self.module(*args, **kwargs)  # raises (the model's own error) when eager fails as well
            self.failed = _error_line(err)
            from util import dist as dist_util

            if dist_util.is_main_process():
                print(f"WARNING: torch.compile (mode={self.mode}) failed: {self.failed}; running eager", flush=True)
            return out


def maybe_compile(model: nn.Module, args: Any) -> nn.Module:
    """``CompiledWithFallback(model, args.compile_mode)`` when ``args.compile``, else ``model`` itself."""
    if not getattr(args, "compile", False):
        return model
    return CompiledWithFallback(model, mode=getattr(args, "compile_mode", None) or "default")
