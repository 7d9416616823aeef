"""What each mask method hides and what the model reconstructs, as image grids.

Columns: original | what the encoder sees | mask channel (segment methods) | reconstruction |
reconstruction pasted into the hidden part of the original.
"""
from __future__ import annotations

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.masking import visible_input


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruction_panels(model, imgs: torch.Tensor, seg_mask: torch.Tensor | None = None,
                          mask_ratio: float = 0.75) -> torch.Tensor:
    """(N, 3, H, W) normalised images -> (N, P, 3, H, W) panels in [0, 1]."""
    model.eval()
    _, pred, weights = model(imgs, mask_ratio=mask_ratio, seg_mask=seg_mask)
    if model.norm_pix_loss:  # predictions are per-patch normalised: bring back the patch statistics
        target = model.patchify(imgs)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** .5 + mean
    recon = model.unpatchify(pred.float())
    if model.mask_method == "patches":
        p = model.patch_size
        hidden = model.unpatchify(weights.unsqueeze(-1).repeat(1, 1, p * p * 3))[:, :1]
        seen = denormalize(imgs) * (1 - hidden) + 0.5 * hidden  # dropped patches greyed
        panels = [denormalize(imgs), seen]
    else:
        hidden = seg_mask.float()
        x = visible_input(imgs, seg_mask, model.mask_method)
        seen = denormalize(x[:, :3]) * (1 - hidden) + 0.5 * hidden
        panels = [denormalize(imgs), seen, (1 - hidden).expand(-1, 3, -1, -1)]  # the visibility channel
    panels += [denormalize(recon), denormalize(imgs * (1 - hidden) + recon * hidden)]
    return torch.stack(panels, dim=1)


def grid_image(panels: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(N, P, 3, H, W) -> one (3, N*(H+pad), P*(W+pad)) image, a row per sample."""
    n, p, c, h, w = panels.shape
    out = torch.ones(c, n * (h + pad), p * (w + pad))
    for i in range(n):
        for j in range(p):
            out[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = panels[i, j].cpu()
    return out
