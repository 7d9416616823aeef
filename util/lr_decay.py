"""Parameter groups for the optimizer: weight decay as the MAE reference (and timm) groups it, and
layer-wise lr decay for finetuning (the reference's util/lr_decay.py: param_groups_lrd)."""
from __future__ import annotations

from typing import Collection

import torch.nn as nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              no_weight_decay: Collection[str] = ()) -> list[dict]:
    """[no-decay group, decay group]: norms, biases (ndim <= 1 or '.bias') and ``no_weight_decay``
    names get none. Frozen parameters are left out. Same groups, same order as the reference
    (timm's add_weight_decay), so its optimizer states load."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for blocks.i, num_layers for everything after the blocks."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(model: nn.Module, weight_decay: float = 0.05,
                             no_weight_decay: Collection[str] = (), layer_decay: float = 0.75) -> list[dict]:
    """Layer-wise lr decay (BEiT / MAE finetuning): the parameters of layer i get
    lr_scale = layer_decay ** (num_layers - i); norms, biases and ``no_weight_decay`` names get no
    weight decay. Groups are keyed 'layer_<i>_<decay|no_decay>' in first-seen order, like the
    reference, so its optimizer states load."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name in no_weight_decay:
            decay_name, this_decay = "no_decay", 0.0
        else:
            decay_name, this_decay = "decay", weight_decay
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{decay_name}"
        if key not in groups:
            groups[key] = {"lr_scale": scales[layer], "weight_decay": this_decay, "params": []}
        groups[key]["params"].append(param)
    return list(groups.values())


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list: Collection[str] = (),
                     layer_decay: float = 0.75) -> list[dict]:
    """The reference's name and keywords for param_groups_layer_decay."""
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list, layer_decay)


get_layer_id_for_vit = layer_id_for_vit  # the reference's name
