"""Sliding-window inference as Segmenter's (rstrudel/segmenter, segm/model/utils.py): an image
whose short side is below the window is first upsampled to it, the windows' logits are averaged
where they overlap, resized to the output size, and only then turned into classes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): regular steps plus one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def upsample_to_window(img: torch.Tensor, window_size: int) -> torch.Tensor:
    """(C, H, W) whose short side is below the window: bilinearly resized so that the short side
    equals the window and the aspect ratio is kept (the long side truncated to an int, as the
    original). Larger images are returned as they are."""
    h, w = img.shape[-2:]
    if min(h, w) >= window_size:
        return img
    size = (window_size, int(w / h * window_size)) if h < w else (int(h / w * window_size), window_size)
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def sliding_window_logits(model: torch.nn.Module, img: torch.Tensor, n_cls: int, window_size: int,
                          window_stride: int, batch_size: int = 4) -> torch.Tensor:
    """img (C, H, W) normalised -> (n_cls, H', W') logits averaged over overlapping windows, at the
    size of the image after upsample_to_window (H', W' >= the window)."""
    img = upsample_to_window(img, window_size)
    _, h, w = img.shape
    boxes = [(t, l) for t in window_starts(h, window_size, window_stride)
             for l in window_starts(w, window_size, window_stride)]
    logits = torch.zeros(n_cls, h, w, device=img.device)
    counts = torch.zeros(1, h, w, device=img.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        crops = torch.stack([img[:, t:t + window_size, l:l + window_size] for t, l in chunk])
        for (t, l), out in zip(chunk, model(crops).float()):
            logits[:, t:t + window_size, l:l + window_size] += out
            counts[:, t:t + window_size, l:l + window_size] += 1
    return logits / counts


@torch.no_grad()
def predict(model: torch.nn.Module, img: torch.Tensor, out_size: tuple[int, int], n_cls: int, window_size: int,
            window_stride: int) -> torch.Tensor:
    """(H, W) class indices at out_size (the label's size): merged logits resized bilinearly, then
    argmax (the original's softmax before it changes no argmax)."""
    logits = sliding_window_logits(model, img, n_cls, window_size, window_stride)
    logits = F.interpolate(logits[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return logits.argmax(0)
