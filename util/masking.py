"""The four mask methods, in one place.

``patches`` is the paper's random token dropping. The three segment methods hide one SAM segment
``m`` (1 = hidden) of the image ``x``; with ``v = 1 - m``:

- ``segments``:      the encoder sees ``x * v`` (3 channels), every token.
- ``four_channels``: the encoder sees ``concat(x * v, v)`` (4 channels), every token.
- ``preencoder``:    ``concat(x * v, v)`` goes through a learned pre-encoder to 3 channels.

For the segment methods the loss is on the hidden pixels only (``--seg_loss pixel``, the default):
``sum(m * e) / sum(m)`` over every hidden pixel and channel, ``e`` the squared error against the
target. ``--seg_loss patch`` keeps the older per-patch form: each patch's mean error weighted by
the fraction of its pixels that are hidden.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_METHODS = ("patches", "segments", "four_channels", "preencoder")
SEGMENT_METHODS = ("segments", "four_channels", "preencoder")
SEG_LOSSES = ("pixel", "patch")
# the 4th input channel of four_channels: this repo feeds v = 1 - m, the original segmae code m
MASK_CHANNELS = ("auto", "visible", "hidden")


def check_mask_method(mask_method: str) -> str:
    if mask_method not in MASK_METHODS:
        raise ValueError(f"unknown mask_method {mask_method!r}; choose one of {', '.join(MASK_METHODS)}")
    return mask_method


def uses_segments(mask_method: str) -> bool:
    """True when the method needs a SAM segment per image (and so a masks/ folder)."""
    return check_mask_method(mask_method) in SEGMENT_METHODS


def encoder_in_chans(mask_method: str, img_chans: int = 3) -> int:
    """Channels of the encoder's patch embedding for a method (the mask channel adds one)."""
    return img_chans + 1 if check_mask_method(mask_method) == "four_channels" else img_chans


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random token dropping by argsort of uniform noise (the MAE reference's algorithm).

    x: (N, L, D). Returns the kept tokens (N, L_keep, D), the binary mask (N, L; 1 = dropped) in the
    original token order, and ``ids_restore`` (N, L) that un-shuffles [kept, dropped] tokens.
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def visible_input(imgs: torch.Tensor, seg_mask: torch.Tensor, mask_method: str) -> torch.Tensor:
    """What a segment method feeds the encoder (or the pre-encoder).

    imgs: (N, C, H, W) normalised images; seg_mask: (N, 1, H, W) or (N, H, W), 1 = hidden.
    Returns ``x * v`` for ``segments`` and ``concat(x * v, v)`` for ``four_channels``/``preencoder``.
    """
    if seg_mask.dim() == 3:
        seg_mask = seg_mask.unsqueeze(1)
    visible = 1.0 - seg_mask.to(imgs.dtype)
    x = imgs * visible
    if mask_method == "segments":
        return x
    if mask_method in ("four_channels", "preencoder"):
        return torch.cat([x, visible], dim=1)
    raise ValueError(f"visible_input is for segment methods, not {mask_method!r}")


def patch_loss_weights(seg_mask: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Hidden fraction of every patch: (N, [1,] H, W) -> (N, L) in row-major patch order."""
    if seg_mask.dim() == 3:
        seg_mask = seg_mask.unsqueeze(1)
    return F.avg_pool2d(seg_mask.float(), kernel_size=patch_size, stride=patch_size).flatten(1)


def weighted_patch_loss(per_patch_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * loss) / sum(w). All-zero weights give 0 (not NaN) and no gradient, so a sample whose
    segment is empty contributes nothing."""
    return (per_patch_loss * weights).sum() / weights.sum().clamp_min(1e-12)


def hidden_pixel_loss(sq_error: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """sum(m * e) / sum(m) over every hidden pixel and channel.

    sq_error: (N, L, p*p*C) squared errors in patchify order (row, col, channel within a patch);
    hidden: (N, L, p*p) the patchified segment mask (1 = hidden), the same for every channel.
    Nothing hidden gives 0 (not NaN) and no gradient."""
    n, length, values = sq_error.shape
    chans = values // hidden.shape[-1]
    per_pixel = sq_error.reshape(n, length, hidden.shape[-1], chans).sum(dim=-1)  # summed over channels
    hidden = hidden.to(per_pixel.dtype)
    return (per_pixel * hidden).sum() / (hidden.sum() * chans).clamp_min(1e-12)
