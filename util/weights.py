"""Weights -> encoder: the one home of what every consumer of pretrained weights needs to know.

``main_pretrain.py`` / ``models_mae.infer_architecture``, ``harness/pretrained.py`` (``main_linprobe.py``,
``main_segment.py``), ``models_vit`` / ``models_seg`` (loading) and ``tools/export_encoder.py`` (a thin CLI over this
module) all read weights through these pieces:

* :data:`KNOWN_ARCHS`: the encoder shape table, ``(patch, width, depth) -> (heads, models_vit factory, timm name)``
  (the heads cannot be read from tensor shapes); ``models_mae``'s factories are ``"mae_" + models_vit factory``;
* :data:`MAE_ONLY_PREFIXES`: the pretraining-checkpoint keys with no counterpart in the encoder;
* :func:`state_dict_of` / :func:`extract_state_dict`: the tensors of any checkpoint layout;
* :func:`count_blocks`, :func:`patch_size_of`, :func:`factory_patch_size`, :func:`encoder_name`: shapes read from
  the weights or the model, never guessed from a model's name;
* :func:`infer_encoder_arch`, :func:`to_timm_state_dict`, :func:`export_encoder`, :func:`load_encoder_file`,
  :func:`build_timm_encoder`: the timm export and reading it back (the GSD-aware way back into the ViT class is
  ``import_encoder`` in the ViT module, beside the model class it builds).

This module holds data and tensor code only: it imports torch, timm (on demand) and ``util.checkpoint``, never this
repository's models (``util/`` sits below them), which is why the way back lives beside the ViT class.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from util.checkpoint import strip_module_prefix
from util.io import atomic_write
from util.pos_embed import gsd_sincos_pos_embed

PathLike = Union[str, os.PathLike]

__all__ = ["KNOWN_ARCHS", "MAE_ONLY_PREFIXES", "count_blocks", "state_dict_of", "extract_state_dict",
           "patch_size_of", "factory_patch_size", "encoder_name", "EncoderArch", "infer_encoder_arch",
           "to_timm_state_dict", "find_norm_stats", "build_metadata", "export_encoder", "load_encoder_file",
           "build_timm_encoder", "FORMAT", "DEFAULT_LICENSE", "RES_SEMANTICS"]

# (patch, embed_dim, depth) -> (num_heads, models_vit factory, timm model name): the one encoder shape table.
KNOWN_ARCHS: dict[tuple[int, int, int], tuple[int, Optional[str], Optional[str]]] = {
    (16, 192, 4): (3, "vit_tiny_patch16", None),  # our demo/test encoder (not a timm model name)
    (16, 192, 12): (3, None, "vit_tiny_patch16_224"),
    (16, 384, 12): (6, None, "vit_small_patch16_224"),
    (16, 768, 12): (12, "vit_base_patch16", "vit_base_patch16_224"),
    (16, 1024, 24): (16, "vit_large_patch16", "vit_large_patch16_224"),
    (14, 1280, 32): (16, "vit_huge_patch14", "vit_huge_patch14_224"),
}

# Keys of a pretraining checkpoint that have no counterpart in the encoder (decoder, heads, unused tables).
MAE_ONLY_PREFIXES = ("mask_token", "mask_token_decoder", "decoder_pos_embed", "decoder_embed.", "decoder_blocks.",
                     "decoder_norm.", "fpn.", "fcn_high.", "fcn_low.", "fcn.", "pos_emb_projection.")


def count_blocks(state: Mapping[str, Any], prefix: str = "blocks.") -> int:
    """Number of distinct ``<prefix><i>.`` indices in a state dict (encoder blocks by default)."""
    ids = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
    return len({i for i in ids if i.isdigit()})


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint['model']``, ``checkpoint['state_dict']`` or the mapping itself, without the DDP
    ``module.`` prefix (may be empty)."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return dict(strip_module_prefix({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}))


def extract_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state_dict_of(checkpoint)``; ``ValueError`` when it holds no tensors."""
    sd = state_dict_of(checkpoint)
    if not sd:
        raise ValueError("checkpoint holds no tensors (expected a state dict or {'model': state_dict})")
    return sd


def patch_size_of(source: Union[torch.nn.Module, Mapping[str, Any]]) -> int:
    """Patch side ``p`` of a model or a state dict, read from ``patch_embed.proj.weight`` ``[D, C, p, p]``.

    ``ValueError`` when there is no such tensor."""
    weight = source.get("patch_embed.proj.weight") if isinstance(source, Mapping) else None
    if weight is None and isinstance(source, torch.nn.Module):
        proj = getattr(getattr(source, "patch_embed", None), "proj", None)
        weight = getattr(proj, "weight", None)
    if weight is None or weight.dim() != 4:
        raise ValueError("no patch embedding (patch_embed.proj.weight [D, C, p, p]) to read the patch size from")
    return int(weight.shape[-1])


def factory_patch_size(factory: Callable[..., torch.nn.Module]) -> int:
    """Patch side of the model a factory builds (built with its defaults on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return patch_size_of(factory())


def encoder_name(patch: int, embed_dim: int, depth: int) -> Optional[str]:
    """The ``models_vit`` factory of an encoder shape, or None when :data:`KNOWN_ARCHS` has none."""
    known = KNOWN_ARCHS.get((patch, embed_dim, depth))
    return known[1] if known is not None else None


FORMAT = "scalemae-timm-encoder/1"
DEFAULT_LICENSE = "CC-BY-NC-4.0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RES_SEMANTICS = (
    "res is a relative ground sample distance that multiplies the integer patch-grid positions inside the 2-D sin-cos "
    "positional embedding (res=1 is the plain MAE embedding; it is not metres). Scale-MAE recomputes the embedding per "
    "sample from input_res; this file stores the fixed table for pos_embed_res, which timm adds as a learned-style "
    "pos_embed, so timm features equal models_vit features with input_res=pos_embed_res at img_size."
)




@dataclass(frozen=True)
class EncoderArch:
    """What is needed to rebuild the encoder; ``timm_kwargs()`` builds an equivalent timm ViT."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    in_chans: int
    img_size: int
    mlp_ratio: float
    global_pool: bool
    models_vit_name: Optional[str]
    timm_name: Optional[str]

    def timm_kwargs(self, num_classes: int = 0) -> dict[str, Any]:
        """Arguments for ``timm.models.vision_transformer.VisionTransformer`` (eps 1e-6 LayerNorm, qkv bias)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    qkv_bias=True, num_classes=num_classes, global_pool="avg" if self.global_pool else "token")




# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------

def infer_encoder_arch(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None,
                       img_size: Optional[int] = None) -> EncoderArch:
    """Encoder architecture from tensor shapes (patch size, width, depth, channels, MLP ratio, pooling).

    ``num_heads`` is looked up in :data:`KNOWN_ARCHS`; an unknown (patch, width, depth) raises ``ValueError`` unless
    ``num_heads`` is given. ``img_size`` defaults to the grid of the checkpoint's ``pos_embed`` (224 if absent).
    """
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("not a ViT encoder state dict: 'patch_embed.proj.weight' is missing "
                         f"(first keys: {list(sd)[:5]})")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; expected (D, C, p, p)")
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = count_blocks(sd)
    if depth == 0:
        raise ValueError("not a ViT encoder state dict: no 'blocks.*' tensors")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    known = KNOWN_ARCHS.get((patch, embed_dim, depth))
    if known is None and num_heads is None:
        names = ", ".join(f"patch {p} width {d} depth {n}" for p, d, n in KNOWN_ARCHS)
        raise ValueError(
            f"unknown encoder shape: patch {patch}, width {embed_dim}, depth {depth} (in_chans {in_chans}); known: "
            f"{names}. Pass num_heads (--num_heads) to export a custom architecture.")
    heads = int(num_heads) if num_heads is not None else known[0]
    if embed_dim % heads:
        raise ValueError(f"num_heads {heads} does not divide the width {embed_dim}")
    if img_size is None:
        pe = sd.get("pos_embed")
        if pe is not None and pe.dim() == 3:
            grid = int(round((pe.shape[1] - 1) ** 0.5))
            img_size = grid * patch if grid * grid + 1 == pe.shape[1] else 224
        else:
            img_size = 224
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
    global_pool = "fc_norm.weight" in sd and "norm.weight" not in sd
    models_vit_name, timm_name = (known[1], known[2]) if known is not None else (None, None)
    if known is not None and num_heads is not None and num_heads != known[0]:
        models_vit_name, timm_name = None, None
    if in_chans != 3 or mlp_ratio != 4.0:
        timm_name = None
    return EncoderArch(patch, embed_dim, depth, heads, in_chans, int(img_size), mlp_ratio, global_pool,
                       models_vit_name, timm_name)


def _reference_keys(arch: EncoderArch) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the equivalent timm ViT without a head (built on the meta device: no memory)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(**arch.timm_kwargs(num_classes=0))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_timm_state_dict(checkpoint: Mapping[str, Any], img_size: Optional[int] = None, res: float = 1.0,
                       num_heads: Optional[int] = None) -> tuple[dict[str, torch.Tensor], EncoderArch]:
    """Convert a checkpoint (any layout accepted by :func:`extract_state_dict`) to a timm ViT encoder state dict.

    Keeps the encoder tensors, drops decoder tensors and any ``head.*``, replaces ``pos_embed`` by the fixed sin-cos
    table of the ``img_size / patch`` grid at ``res`` (float32, cls slot zero). Every tensor of the timm model except
    the head must be present with the right shape; anything unrecognised raises ``ValueError`` naming the keys.
    """
    sd = extract_state_dict(checkpoint)
    arch = infer_encoder_arch(sd, num_heads=num_heads, img_size=img_size)
    ref = _reference_keys(arch)
    dropped = [k for k in sd if k.startswith(MAE_ONLY_PREFIXES) or k.startswith("head.")]
    unknown = [k for k in sd if k not in ref and k not in dropped]
    if arch.global_pool:
        unknown = [k for k in unknown if not k.startswith("norm.")]
    if unknown:
        raise ValueError(f"checkpoint has tensors that are neither encoder nor decoder/head tensors: {unknown[:10]}"
                         + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    grid = arch.img_size // arch.patch_size
    table = gsd_sincos_pos_embed(arch.embed_dim, grid, torch.tensor([float(res)], dtype=torch.float64))
    out: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for key, shape in ref.items():
        if key == "pos_embed":
            value = table.float()
        elif key not in sd:
            missing.append(key)
            continue
        else:
            value = sd[key]
        if tuple(value.shape) != shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs timm {shape}")
            continue
        value = value.detach()
        if value.device.type not in ("cpu", "meta"):  # meta: shape-only checks
            value = value.cpu()
        out[key] = value.contiguous()
    if missing or mismatched:
        raise ValueError(f"checkpoint does not hold a complete {arch.embed_dim}-wide, {arch.depth}-block encoder: "
                         f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}; shape mismatches "
                         f"{mismatched[:10]}")
    return out, arch


def find_norm_stats(checkpoint: Mapping[str, Any]) -> Optional[tuple[list[float], list[float]]]:
    """mean/std recorded in a checkpoint's plain ``args`` (a nested dict with both keys), if any."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    stack = [args] if isinstance(args, Mapping) else []
    while stack:
        item = stack.pop()
        if isinstance(item.get("mean"), (list, tuple)) and isinstance(item.get("std"), (list, tuple)):
            return [float(v) for v in item["mean"]], [float(v) for v in item["std"]]
        stack.extend(v for v in item.values() if isinstance(v, Mapping))
    return None


def build_metadata(arch: EncoderArch, res: float, mean: Sequence[float], std: Sequence[float],
                   license: str = DEFAULT_LICENSE, source: str = "", extra: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, Any]:
    """Metadata stored in the sidecar JSON (as is) and in the safetensors header (values as strings)."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "timm_model": arch.timm_name,
        "models_vit_model": arch.models_vit_name,
        "architecture": asdict(arch),
        "timm_kwargs": arch.timm_kwargs(num_classes=0),
        "img_size": arch.img_size,
        "pos_embed_res": float(res),
        "pos_embed": (f"fixed 2-D sin-cos table of the {arch.img_size // arch.patch_size}x"
                      f"{arch.img_size // arch.patch_size} patch grid at res={float(res):g} with a zero cls slot; "
                      f"timm adds it as pos_embed, which equals models_vit with input_res={float(res):g}"),
        "res_semantics": RES_SEMANTICS,
        "input_normalization": {"pixel_scale": "divide 8-bit pixels by 255 first", "mean": list(mean),
                                "std": list(std)},
        "license": license,
        "license_note": ("the released Scale-MAE weights (bair-climate-initiative/scale-mae) are CC-BY-NC-4.0; "
                         "files derived from them carry that licence"),
        "source_checkpoint": source,
    }
    if extra:
        meta.update(extra)
    return meta


def _safetensors_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def export_encoder(checkpoint: Union[PathLike, Mapping[str, Any]], output: PathLike, img_size: Optional[int] = None,
                   res: float = 1.0, num_heads: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, license: str = DEFAULT_LICENSE,
                   formats: Sequence[str] = ("pth", "safetensors")) -> dict[str, Any]:
    """Write ``<output>.pth`` / ``<output>.safetensors`` (as selected by ``formats``) and ``<output>.json``.

    ``output`` is a path prefix (a ``.pth``/``.safetensors``/``.json`` suffix is stripped). ``mean``/``std``
    default to the checkpoint's recorded stats, else the FMoW/ImageNet stats the release was trained with.
    Returns ``{'paths': {...}, 'metadata': {...}, 'arch': EncoderArch}``.
    """
    from safetensors.torch import save_file

    from util.checkpoint import load_checkpoint, save_checkpoint

    source = ""
    if not isinstance(checkpoint, Mapping):
        source = os.path.basename(os.fspath(checkpoint))
        checkpoint = load_checkpoint(checkpoint)
    state, arch = to_timm_state_dict(checkpoint, img_size=img_size, res=res, num_heads=num_heads)
    stats = find_norm_stats(checkpoint)
    if mean is None:
        mean = stats[0] if stats else list(IMAGENET_MEAN)
    if std is None:
        std = stats[1] if stats else list(IMAGENET_STD)
    if len(mean) != arch.in_chans or len(std) != arch.in_chans:
        raise ValueError(f"mean/std need {arch.in_chans} values (one per input channel), got {len(mean)}/{len(std)}")
    extra = {"source_epoch": checkpoint.get("epoch")} if isinstance(checkpoint.get("epoch"), int) else None
    meta = build_metadata(arch, res, mean, std, license=license, source=source, extra=extra)

    prefix = Path(output)
    if prefix.suffix in (".pth", ".safetensors", ".json"):
        prefix = prefix.with_suffix("")
    paths: dict[str, Path] = {}
    unknown = set(formats) - {"pth", "safetensors"}
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from pth, safetensors")
    if "pth" in formats:
        paths["pth"] = save_checkpoint(state, prefix.with_name(prefix.name + ".pth"))
    if "safetensors" in formats:
        st_path = prefix.with_name(prefix.name + ".safetensors")
        atomic_write(st_path, by_name=True, write=lambda tmp: save_file(state, tmp, metadata=_safetensors_metadata(meta)))
        paths["safetensors"] = st_path
    json_path = prefix.with_name(prefix.name + ".json")
    sidecar = {**meta, "files": {k: p.name for k, p in paths.items()},
               "keys": len(state), "parameters": int(sum(v.numel() for v in state.values()))}

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2)
            f.write("\n")

    atomic_write(json_path, write_json, by_name=True)
    paths["json"] = json_path
    return {"paths": paths, "metadata": meta, "arch": arch}


# --------------------------------------------------------------------------------------------------------------
# Reading exported files back
# --------------------------------------------------------------------------------------------------------------

def load_encoder_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata of an exported file (``.safetensors`` or ``.pth``; the sidecar JSON if present).

    Safetensors header values that hold JSON are decoded. Also accepts any checkpoint ``.pth`` (metadata ``{}``).
    """
    path = Path(path)
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"encoder file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                meta[k] = v
        state = load_file(str(path))
    else:
        from util.checkpoint import load_checkpoint

        state = extract_state_dict(load_checkpoint(path))
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
    return state, meta




def build_timm_encoder(path: PathLike, num_classes: int = 0):
    """A plain timm ``VisionTransformer`` loaded from an exported file (``strict=False``: only ``head.*`` may be
    missing). Uses ``timm.create_model(<timm_model>)`` for standard sizes, the class directly otherwise."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    state, meta = load_encoder_file(path)
    num_heads = meta.get("architecture", {}).get("num_heads") if isinstance(meta.get("architecture"), Mapping) else None
    arch = infer_encoder_arch(state, num_heads=num_heads)
    if arch.timm_name is not None:
        model = timm.create_model(arch.timm_name, pretrained=False, num_classes=num_classes,
                                  img_size=arch.img_size, global_pool="avg" if arch.global_pool else "token")
    else:
        model = VisionTransformer(**arch.timm_kwargs(num_classes=num_classes))
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith("head.")]
    if bad or result.unexpected_keys:
        raise ValueError(f"{path}: missing {bad}, unexpected {result.unexpected_keys}")
    return model
