"""The learning rate per iteration (the MAE reference's schedule): linear warmup, then a
half-cycle cosine down to min_lr."""
from __future__ import annotations

import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch: linear warmup, then half-cycle cosine down to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Sets every param group's lr (scaled by its 'lr_scale', used by layer-wise decay); args holds
    --lr, --min_lr, --warmup_epochs and --epochs."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
    return lr
