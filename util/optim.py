"""Optimizer construction: weight-decay groups as the MAE reference, fused AdamW on GPU."""
from __future__ import annotations

from typing import Collection

import torch
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


ADAMW_IMPLS = ("auto", "fused", "foreach", "forloop")


OPTIMIZERS = ("adamw", "lars")


def build_optimizer(args, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer the flags name: --opt adamw with --opt_betas / --opt_eps, or --opt lars."""
    if args.opt == "lars":
        return LARS(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    return adamw(param_groups, lr=args.lr, device=device, betas=tuple(args.opt_betas), eps=args.opt_eps)


def adamw(param_groups: list[dict], lr: float, device: torch.device, betas=(0.9, 0.95),
          impl: str = "auto", eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW. ``auto``: the fused kernel on GPUs (one launch for all parameters), PyTorch's default
    elsewhere; ``fused`` / ``foreach`` / ``forloop`` force an implementation (same numbers, different
    speed; tools/throughput.py compares them)."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"unknown AdamW implementation {impl!r}; choose one of {', '.join(ADAMW_IMPLS)}")
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "default"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False},
              "default": {}}[impl]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, **kwargs)


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


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as MAE's linear probing uses:
    for weights (ndim > 1) the update is scaled by trust_coefficient * ||w|| / ||g + wd * w||;
    biases and norms take plain SGD-momentum steps without weight decay."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss
