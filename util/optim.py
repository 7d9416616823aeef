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


def adamw(param_groups: list[dict], lr: float, device: torch.device, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with the fused CUDA kernel on GPUs (one launch for all parameters)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)
