#!/usr/bin/env python
"""Export the Scale-MAE encoder as a plain timm ViT state dict (``.pth`` + ``.safetensors`` + sidecar JSON).

Input: a pretraining checkpoint (ours, or the original release ``{'model': ...}``), a ``main_linprobe.py``
checkpoint, or a bare state dict. Output keys are exactly those of
``timm.create_model('vit_large_patch16_224', num_classes=0)`` (for ViT-L; likewise for the other sizes):
``cls_token, pos_embed, patch_embed.proj.*, blocks.*, norm.*`` (``fc_norm.*`` instead of ``norm.*`` for a
global-pool finetuned encoder, which timm builds with ``global_pool='avg'``). Decoder tensors and any classifier
head are dropped.

Positional embedding. Scale-MAE recomputes a GSD-scaled 2-D sin-cos embedding on every forward from the per-sample
``input_res``; the learned ``pos_embed`` of the checkpoint is never used. timm instead *adds* its stored
``pos_embed``. The export therefore stores the fixed sin-cos table of the model's patch grid at ``res`` (default 1,
cls slot zero), so a timm model loaded from it computes exactly what ``models_vit`` computes with ``input_res=res``
at that input size. To evaluate at other resolutions, import the file back into ``models_vit``
(``models_vit.import_encoder``) and pass ``input_res`` per sample.

This file is the command line only: the export, the shape table and the reading back live in ``util/weights.py``
(``models_vit.import_encoder`` for the GSD-aware import); the names below are re-exported from there.

Usage::

    python tools/export_encoder.py scalemae-vitlarge-800.pth --output exported/scalemae_vitl16
    # -> exported/scalemae_vitl16.pth, .safetensors, .json

    import timm, torch
    model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load("exported/scalemae_vitl16.pth", weights_only=True))

    from models_vit import import_encoder
    encoder = import_encoder("exported/scalemae_vitl16.safetensors", num_classes=45)   # models_vit, GSD-aware

Licence: the released Scale-MAE weights are CC-BY-NC-4.0; files derived from them carry that licence (recorded in
the metadata; ``--license`` sets it for your own weights).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script without `pip install -e .`
    sys.path.insert(0, str(_REPO_ROOT))

from models_vit import import_encoder  # noqa: E402
from util.weights import (DEFAULT_LICENSE, KNOWN_ARCHS, EncoderArch, build_metadata,  # noqa: E402
                          build_timm_encoder, export_encoder, extract_state_dict, infer_encoder_arch,
                          load_encoder_file, to_timm_state_dict)

__all__ = [
    "EncoderArch",
    "KNOWN_ARCHS",
    "extract_state_dict",
    "infer_encoder_arch",
    "to_timm_state_dict",
    "build_metadata",
    "export_encoder",
    "load_encoder_file",
    "import_encoder",
    "build_timm_encoder",
    "main",
]


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    from harness import ArgumentParser  # one-line errors, closest flag for a typo

    p = ArgumentParser(
        description="Export a Scale-MAE encoder as a timm ViT state dict (.pth + .safetensors + .json).")
    p.add_argument("checkpoint", help="pretraining checkpoint (ours or the original release), linprobe/finetune "
                                      "checkpoint, or state dict; path or file:// / https:// URL")
    p.add_argument("--output", "-o", required=True,
                   help="output path prefix: writes PREFIX.pth, PREFIX.safetensors and PREFIX.json")
    p.add_argument("--img_size", type=int, default=None,
                   help="input size the stored pos_embed table is built for (default: the checkpoint's grid, 224)")
    p.add_argument("--res", type=float, default=1.0,
                   help="relative GSD baked into the stored pos_embed table (default 1.0 = plain MAE embedding)")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads; needed only for architectures not in the known list")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="input normalisation mean recorded in the metadata (default: checkpoint's, else ImageNet)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std (see --mean)")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help=f"licence recorded in the metadata (default {DEFAULT_LICENSE}, that of the released weights)")
    p.add_argument("--format", choices=["both", "pth", "safetensors"], default="both",
                   help="which weight files to write (the JSON sidecar is always written)")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors (also: SCALEMAE_DEBUG=1)")
    return p


def _check_args(args: argparse.Namespace, formats: Sequence[str]) -> None:
    from harness import UserError

    if args.img_size is not None and args.img_size <= 0:
        raise UserError(f"--img_size {args.img_size}: must be > 0")
    if not args.res > 0 or args.res != args.res:
        raise UserError(f"--res {args.res}: must be > 0 (a relative GSD)")
    if args.num_heads is not None and args.num_heads <= 0:
        raise UserError(f"--num_heads {args.num_heads}: must be > 0")
    prefix = Path(args.output)
    if prefix.suffix in (".pth", ".safetensors", ".json"):
        prefix = prefix.with_suffix("")
    if "://" not in args.checkpoint:
        source = Path(args.checkpoint).expanduser().resolve()
        for suffix in [*(f".{f}" for f in formats), ".json"]:
            target = prefix.with_name(prefix.name + suffix).expanduser().resolve()
            if target == source:
                raise UserError(f"--output {args.output} would overwrite the input checkpoint {args.checkpoint}; "
                                f"choose another output prefix")
    if prefix.exists() and prefix.is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file prefix such as {prefix / 'encoder'}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Export as the command line asks (``args`` from :func:`get_args_parser`)."""
    formats = ("pth", "safetensors") if args.format == "both" else (args.format,)
    _check_args(args, formats)
    result = export_encoder(args.checkpoint, args.output, img_size=args.img_size, res=args.res,
                            num_heads=args.num_heads, mean=args.mean, std=args.std, license=args.license,
                            formats=formats)
    arch = result["arch"]
    print(f"encoder: patch {arch.patch_size}, width {arch.embed_dim}, depth {arch.depth}, heads {arch.num_heads}, "
          f"img_size {arch.img_size}, pos_embed res {args.res:g}")
    if arch.timm_name:
        print(f"timm: timm.create_model('{arch.timm_name}', pretrained=False, num_classes=0"
              + (f", img_size={arch.img_size}" if arch.img_size != 224 else "") + ")")
    else:
        print(f"timm: timm.models.vision_transformer.VisionTransformer(**{arch.timm_kwargs(0)})")
    for kind, path in result["paths"].items():
        print(f"wrote {kind}: {path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse ``argv`` and export; errors raise (``python tools/export_encoder.py`` prints them as one line)."""
    return run(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    import harness

    harness.run(run, get_args_parser())
