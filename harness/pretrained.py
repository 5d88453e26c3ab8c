"""Pretrained encoder weights: reading them and telling their architecture (one home for every consumer).

``main_linprobe.py``, ``main_segment.py`` and ``tools/export_encoder.py`` start from the same files: a pretraining
checkpoint (ours or the original release, ``{'model': state_dict, 'args': ...}``), a bare or ``{'state_dict': ...}``
state dict, or an exported encoder (``.pth`` / ``.safetensors``). What they share lives here:

* the encoder shape table, the state-dict extractor and the export: ``util/weights.py`` (re-exported:
  ``state_dict_of``);
* ``read_pretrained(path)``: (state dict, saved args) of ``--checkpoint_path``, errors as one line;
* ``resolve_model_name(name)``: a ``models_vit`` encoder name (MAE names map to their encoder);
* ``architecture_of(state, saved_args, source)``: the encoder's ``models_vit`` name, from its saved ``--model`` or
  its tensor shapes;
* ``read_start(args, out_dir, writer)``: what a launcher that starts from pretrained weights starts from (its own
  resumed checkpoint, else ``--checkpoint_path``), with the checks both such launchers make;
* ``choose_encoder(...)``: the encoder such a launcher builds (``--model``, else the weights').

(``main_pretrain.py`` rebuilds the whole MAE, decoder included, from ``models_mae.infer_architecture``.)
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from harness.checkpoints import checkpoint_kind, checkpoint_writer, find_resume, read_checkpoint
from harness.errors import UserError, require
from util.checkpoint import strip_module_prefix
from util.weights import KNOWN_ARCHS, count_blocks, encoder_name, state_dict_of

__all__ = ["state_dict_of", "read_pretrained", "resolve_model_name", "architecture_of", "read_start", "choose_encoder"]


def read_pretrained(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, saved args) from ``--checkpoint_path``: ``{'model': ...}`` checkpoints, bare state dicts,
    ``.safetensors``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise UserError(f"--checkpoint_path {path}: file not found")
        try:
            return load_file(path), {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"--checkpoint_path {path}: not a readable safetensors file ({err})") from None
    ckpt = read_checkpoint(path, "--checkpoint_path")
    if checkpoint_writer(ckpt) == "main_segment":  # its encoder tensors are backbone.*: not pretrained weights
        raise UserError(f"--checkpoint_path {path}: {checkpoint_kind(ckpt)}; --checkpoint_path "
                        f"takes pretrained weights (main_pretrain.py or an exported encoder)")
    saved_args = ckpt.get("args") if isinstance(ckpt.get("args"), Mapping) else {}
    return state_dict_of(ckpt), saved_args


def resolve_model_name(name: str, quiet: bool = False) -> str:
    """A ``models_vit`` factory name; MAE names (``mae_vit_large_patch16[_dec512d8b]``) map to their encoder."""
    import models_vit

    if name in models_vit.MODELS:
        return name
    if name.startswith("mae_"):
        encoder = name[len("mae_"):]
        if encoder.endswith("_dec512d8b"):
            encoder = encoder[: -len("_dec512d8b")]
        if encoder in models_vit.MODELS:
            if not quiet:
                print(f"NOTE: --model {name} is a pretraining model; using its encoder {encoder}")
            return encoder
    raise UserError(f"--model {name!r} is not an encoder; choose from {sorted(models_vit.MODELS)} "
                    f"(or an MAE name such as mae_vit_large_patch16)")


def architecture_of(state: Mapping[str, torch.Tensor], saved_args: Mapping, source: str) -> str:
    """The ``models_vit`` name of a checkpoint: its saved ``--model``, else its tensor shapes."""
    saved = saved_args.get("model") if saved_args else None
    if isinstance(saved, str):
        with contextlib.suppress(SystemExit):
            return resolve_model_name(saved, quiet=True)
    weight = state.get("patch_embed.proj.weight")
    if weight is None:
        raise UserError(f"{source}: no encoder tensors (patch_embed.proj.weight is missing); is it a "
                        f"Scale-MAE checkpoint?")
    key = (int(weight.shape[-1]), int(weight.shape[0]), count_blocks(state))
    name = encoder_name(*key)
    if name is None:
        known = sorted(v[1] for v in KNOWN_ARCHS.values() if v[1] is not None)
        raise UserError(f"{source}: encoder (patch {key[0]}, width {key[1]}, depth {key[2]}) matches no "
                        f"model in {known}; pass --model")
    return name


def read_start(args: argparse.Namespace, out_dir: Path, writer: str
               ) -> tuple[Optional[str], Optional[dict], Optional[dict[str, torch.Tensor]], dict]:
    """``(resume, resumed checkpoint, pretrained state dict, its saved args)`` of a launcher that starts from
    pretrained weights: ``--resume`` / autoresume of this launcher's own run (``writer``), else ``--checkpoint_path``
    (not read when resuming). One-line errors: a resumed file without ``model`` or written by another launcher, and
    no weights at all without ``--allow_random_init``."""
    flag = "--resume" if args.resume else "autoresume"
    resume = find_resume(args, out_dir, writer)
    resumed = read_checkpoint(resume, flag) if resume else None
    if resumed is not None:
        written_by = checkpoint_writer(resumed)
        kind = checkpoint_kind(resumed)
        if "model" not in resumed or written_by not in (None, writer):
            raise UserError(f"{flag} {resume}: not a checkpoint of {writer}.py ("
                            + (kind if kind else f"keys: {sorted(resumed)[:8]}")
                            + f"); {flag} continues a run of {writer}.py, pretrained weights go to "
                              f"--checkpoint_path")
    if resumed is not None and args.checkpoint_path:
        saved = resumed.get("args") if isinstance(resumed.get("args"), Mapping) else {}
        started_from = saved.get("checkpoint_path")
        if started_from != args.checkpoint_path:
            missing = "" if os.path.exists(args.checkpoint_path) else " (that file does not exist)"
            print(f"WARNING: {flag} {resume}: its weights are used; --checkpoint_path {args.checkpoint_path}{missing} "
                         f"is ignored (this run started from {started_from or 'no --checkpoint_path'}; use another "
                         f"--output_dir to start a new run from it)")
    pretrained, pretrained_args = (None, {})
    if args.checkpoint_path and resumed is None:
        pretrained, pretrained_args = read_pretrained(args.checkpoint_path)
    require(resumed is not None or pretrained is not None or args.allow_random_init,
            "no weights: pass --checkpoint_path <pretrained.pth> (or --resume a run of this script; "
            "--allow_random_init trains a randomly initialised encoder)")
    return resume, resumed, pretrained, pretrained_args


def choose_encoder(args: argparse.Namespace, resume: Optional[str], resumed: Optional[Mapping],
                   pretrained: Optional[Mapping[str, torch.Tensor]], pretrained_args: Mapping, default: str,
                   prefix: str = "") -> str:
    """Set and return ``args.model``, the ``models_vit`` encoder of a launcher that starts from pretrained weights
    (:func:`read_start`'s result): ``--model``; else the resumed checkpoint's (its saved ``--model``, else the
    shapes of its tensors under ``prefix``); else the pretrained weights'; else ``default``."""
    if args.model is not None:
        args.model = resolve_model_name(args.model)
        return args.model
    if resumed is not None:
        state = {k[len(prefix):]: v for k, v in strip_module_prefix(resumed["model"]).items() if k.startswith(prefix)}
        saved = resumed.get("args") if isinstance(resumed.get("args"), Mapping) else {}
        args.model = architecture_of(state, saved, str(resume))
        print(f"--model not given: {args.model}, from {resume}")
    elif pretrained is not None:
        args.model = architecture_of(pretrained, pretrained_args, args.checkpoint_path)
        print(f"--model not given: {args.model}, from {args.checkpoint_path}")
    else:
        args.model = default
    return args.model
