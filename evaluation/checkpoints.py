"""Checkpoints of a suite: read once at start-up (architecture, patch, weights hash), rebuilt only when a cell of
theirs has features to compute. The model is built exactly as ``main_pretrain.py --eval_only`` builds it (its own
functions), so that the features, and hence the kNN numbers, are the same."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Optional

import torch

import harness

__all__ = ["CheckpointInfo", "inspect_checkpoint", "weights_hash", "build_eval_model"]


@dataclass
class CheckpointInfo:
    name: str
    source: str
    model: str  # models_mae factory name
    overrides: dict = field(default_factory=dict)  # architecture/behaviour kwargs read from the checkpoint
    patch: int = 16
    weights: str = ""  # sha256 of the state dict (names, dtypes, shapes, bytes) and the behaviour kwargs


def weights_hash(state_dict: dict, extra: Optional[dict] = None) -> str:
    """sha256 over the tensors (sorted names, dtype, shape, raw bytes) and ``extra`` (JSON): two files with the same
    weights (other optimizer state, other epoch counter) hash alike."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _pretrain_args(model: Optional[str]):
    import main_pretrain

    argv = ["--eval_only", "--allow_random_init"] + (["--model", model] if model else [])
    return main_pretrain.get_args_parser().parse_args(argv)


def _read(source: str, name: str) -> dict:
    ckpt = harness.read_checkpoint(source, f"checkpoint {name}")
    writer = harness.checkpoint_writer(ckpt)
    if "model" not in ckpt or writer not in (None, "main_pretrain"):
        kind = harness.checkpoint_kind(ckpt)
        raise harness.UserError(f"checkpoint {name} ({source}): not a pretraining checkpoint ("
                                + (kind if kind else f"keys: {sorted(ckpt)[:8]}")
                                + "); suites evaluate checkpoints of main_pretrain.py (or the original release)")
    return ckpt


def inspect_checkpoint(name: str, source: str, expected_model: Optional[str]) -> CheckpointInfo:
    """Read a checkpoint and say what it is; a file of another architecture than ``expected_model`` (the suite's
    ``model``) is a ``UserError``."""
    import main_pretrain
    import models_mae
    from util.checkpoint import strip_module_prefix
    from util.weights import factory_patch_size

    ckpt = _read(source, name)
    with contextlib.redirect_stdout(io.StringIO()):  # its "--model not given" note: said once below instead
        model, overrides = main_pretrain.resolve_model_name(_pretrain_args(None), ckpt)
    if expected_model is not None and models_mae.MODELS[model] is not models_mae.MODELS[expected_model]:
        raise harness.UserError(f"checkpoint {name} ({source}) is {model}, but the suite's model is "
                                f"{expected_model}: evaluate it with a suite of its architecture (or change model:)")
    patch = factory_patch_size(models_mae.MODELS[model])
    state = strip_module_prefix(ckpt["model"])
    digest = weights_hash(state, {"model": model, **overrides})
    return CheckpointInfo(name, source, model, overrides, patch, digest)


def build_eval_model(info: CheckpointInfo, device: torch.device) -> torch.nn.Module:
    """The MAE of ``info`` with its weights, built like ``main_pretrain.py --eval_only`` (eval mode, on device)."""
    import main_pretrain

    ckpt = _read(info.source, info.name)
    args = _pretrain_args(None)
    with contextlib.redirect_stdout(io.StringIO()):
        name, overrides = main_pretrain.resolve_model_name(args, ckpt)
    in_chans = overrides.pop("in_chans", 3)
    args.model = name
    main_pretrain.validate_sizes(args, info.patch)
    model = main_pretrain.build_model(args, name, overrides, in_chans)
    main_pretrain.load_model_weights(model, ckpt["model"], info.source)
    return model.to(device).eval()
