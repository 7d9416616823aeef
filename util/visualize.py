"""What each mask method hides and what the model reconstructs, as labelled image grids.

Columns (PANEL_TITLES): original | what the encoder sees (hidden part grey) | the hidden part
(black: dropped patches or the SAM segment) | reconstruction | reconstruction pasted into the
hidden part of the original. One row per image, labelled.
"""
from __future__ import annotations

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.masking import as_nchw, get_method

PANEL_TITLES = ("original", "encoder input", "hidden: {what}", "reconstruction", "pasted into hidden part")


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
    if seg_mask is None:  # dropped patches: the per-patch mask, on the image grid
        p = model.patch_size
        hidden = model.unpatchify(weights.unsqueeze(-1).repeat(1, 1, p * p * 3))[:, :1]
    else:
        hidden = as_nchw(seg_mask).float()
    seen = denormalize(model.method.shown_input(imgs, seg_mask)) * (1 - hidden) + 0.5 * hidden  # hidden part grey
    panels = [denormalize(imgs), seen, (1 - hidden).expand(-1, 3, -1, -1)]  # the visibility
    panels += [denormalize(recon), denormalize(imgs * (1 - hidden) + recon * hidden)]
    return torch.stack(panels, dim=1)


def panel_titles(mask_method: str) -> list[str]:
    what = get_method(mask_method).hidden_label
    return [t.format(what=what) for t in PANEL_TITLES]


def labelled_grid(panels: torch.Tensor, titles: list[str], row_labels: list[str], min_panel: int = 224,
                  pad: int = 4) -> "Image.Image":
    """(N, P, 3, H, W) panels in [0, 1] -> a PIL image: a title above each column, a label left of
    each row, every panel upscaled (nearest, so pixels stay visible) to at least min_panel px."""
    from PIL import Image, ImageDraw, ImageFont
    n, p, _, h, w = panels.shape
    scale = max(1, -(-min_panel // min(h, w)))  # ceil
    ph, pw = h * scale, w * scale
    try:
        font = ImageFont.load_default(size=max(12, pw // 14))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(measure.textbbox((0, 0), t, font=font)[3] for t in titles) + 2 * pad
    label_w = max(measure.textbbox((0, 0), t, font=font)[2] for t in row_labels) + 2 * pad
    grid = Image.new("RGB", (label_w + p * (pw + pad), text_h + n * (ph + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(titles[:p]):
        tw = measure.textbbox((0, 0), title, font=font)[2]
        draw.text((label_w + j * (pw + pad) + max(0, (pw - tw) // 2), pad), title, fill="black", font=font)
    for i in range(n):
        y = text_h + i * (ph + pad)
        draw.text((pad, y + ph // 2 - text_h // 2), row_labels[i], fill="black", font=font)
        for j in range(p):
            arr = (panels[i, j].float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            grid.paste(Image.fromarray(arr).resize((pw, ph), Image.NEAREST), (label_w + j * (pw + pad), y))
    return grid
