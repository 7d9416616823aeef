"""Segmentation metrics from a dataset-level confusion matrix kept on the device."""
from __future__ import annotations

import torch
import torch.distributed as dist

from segmenter.data import IGNORE_INDEX


class ConfusionMatrix:
    """rows = ground truth, columns = prediction; ignore-labelled pixels are skipped."""

    def __init__(self, n_cls: int, device: torch.device | str = "cpu"):
        self.n_cls = n_cls
        self.mat = torch.zeros(n_cls, n_cls, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != IGNORE_INDEX
        idx = target[valid].long() * self.n_cls + pred[valid].long()
        self.mat += torch.bincount(idx, minlength=self.n_cls ** 2).reshape(self.n_cls, self.n_cls)

    def reduce(self) -> None:
        """Sums the matrices of all ranks (every rank gets the total)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self) -> dict:
        """mIoU, pixel accuracy and mean class accuracy in percent, and per-class IoU (None for a
        class absent from both ground truth and prediction, which the mean excludes)."""
        mat = self.mat.double().cpu()
        tp = mat.diag()
        gt, pred = mat.sum(1), mat.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = mat.sum()
        if total == 0:  # no labelled pixel at all: there is no score, not a score of 0
            import warnings
            warnings.warn("no valid (labelled) pixel was scored: mIoU and accuracies are NaN", RuntimeWarning)
        nan = float("nan")
        return {
            "mIoU": 100.0 * float(iou.nanmean()) if (union > 0).any() else nan,
            "pixel_accuracy": 100.0 * float(tp.sum() / total) if total > 0 else nan,
            "mean_class_accuracy": 100.0 * float(acc.nanmean()) if (gt > 0).any() else nan,
            "per_class_iou": [None if torch.isnan(v) else 100.0 * float(v) for v in iou],
        }
