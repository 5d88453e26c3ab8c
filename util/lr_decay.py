"""Optimizer parameter groups: plain weight-decay split and ViT layer-wise learning-rate decay.

Each group is a dict accepted by ``torch.optim.AdamW`` with the extra keys ``lr_scale`` (used by
``util.lr_sched.adjust_learning_rate``), ``name`` and ``param_names`` (for logging and for
``apply_linear_layer_scale``); optimizers ignore extra keys and keep them in their state dict.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

__all__ = ["param_groups_weight_decay", "param_groups_lrd", "get_layer_id_for_vit", "apply_linear_layer_scale"]

_STEM_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token")


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              no_weight_decay_list: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two groups, in this order: ``decay`` (trainable params with ``ndim >= 2`` whose name is not in
    ``no_weight_decay_list``; weight decay ``weight_decay``) and ``no_decay`` (the rest; weight decay 0).

    Frozen parameters are left out; parameters keep ``model.named_parameters()`` order. For the Scale-MAE
    pretraining model this matches the original optimizer layout: ``cls_token``/``mask_token`` (3-D) are
    decayed, biases and norm weights are not. Both groups have ``lr_scale`` 1.0. Both are always returned
    (one may be empty) so group indices are stable.
    """
    skip = set(no_weight_decay_list)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name in skip:
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "decay", "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay",
         "param_names": no_decay_names},
    ]


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer index of a timm-style ViT parameter: 0 for the stem (``cls_token``, ``pos_embed``, ``patch_embed.*``,
    also ``reg_token``/``dist_token``), ``i + 1`` for ``blocks.i.*``, ``num_layers + 1`` for everything else."""
    if name in _STEM_NAMES or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05,
                     no_weight_decay_list: Iterable[str] = ("pos_embed", "cls_token"),
                     layer_decay: float = 0.75, num_layers: int | None = None) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise lr decay for finetuning a timm-style ViT.

    Parameters are grouped by (layer id, decay/no-decay) in order of first appearance in
    ``model.named_parameters()``; group names are ``layer_{id}_decay`` / ``layer_{id}_no_decay``. Layer ids come
    from ``get_layer_id_for_vit``; ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``; weight decay is 0 for
    1-D (and 0-D) params and for names in ``no_weight_decay_list``. Frozen params are left out.
    ``num_layers`` defaults to ``len(model.blocks)``.
    """
    if num_layers is None:
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError(f"param_groups_lrd: {type(model).__name__} has no 'blocks'; pass num_layers explicitly")
        num_layers = len(blocks)
    skip = set(no_weight_decay_list)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name in skip
        layer_id = get_layer_id_for_vit(name, num_layers)
        group_name = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if group_name not in groups:
            groups[group_name] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - layer_id),
                "name": group_name,
                "param_names": [],
            }
        groups[group_name]["params"].append(param)
        groups[group_name]["param_names"].append(name)
    return list(groups.values())


def apply_linear_layer_scale(param_groups: list[dict[str, Any]], linear_layer_scale: float,
                             head_prefix: str = "head.") -> list[dict[str, Any]]:
    """Multiply ``lr_scale`` by ``linear_layer_scale`` for every group made only of ``head_prefix*`` params.

    The original script scaled "the last param group", which with ``param_groups_lrd``'s ordering is the group
    holding just the head weight (``layer_{L+1}_decay``); the head bias shares ``layer_{L+1}_no_decay`` with the
    final norm and is therefore not scaled. This function reproduces that by name instead of by position. Groups
    need ``param_names`` (as built by this module). Raises if the scale is not 1 and no group qualifies.
    Modifies the groups in place and returns them.
    """
    if linear_layer_scale == 1.0:
        return param_groups
    hit = False
    for group in param_groups:
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"apply_linear_layer_scale: param group {group.get('name', '?')!r} has no 'param_names'")
        if names and all(n.startswith(head_prefix) for n in names):
            group["lr_scale"] = group.get("lr_scale", 1.0) * linear_layer_scale
            hit = True
    if not hit:
        raise ValueError(f"apply_linear_layer_scale: no param group consists only of '{head_prefix}*' parameters; "
                         f"groups: {[g.get('name') for g in param_groups]}")
    return param_groups
