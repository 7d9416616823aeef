"""Sliding-window inference: class probabilities averaged over overlapping windows."""
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


@torch.no_grad()
def sliding_window_probs(model: torch.nn.Module, img: torch.Tensor, n_cls: int, window_size: int,
                         window_stride: int, batch_size: int = 4) -> torch.Tensor:
    """img (C, H, W) normalised -> (n_cls, H, W) softmax probabilities, averaged where windows
    overlap. An image smaller than the window is padded (zeros) and the padding cropped away."""
    c, h, w = img.shape
    ph, pw = max(h, window_size), max(w, window_size)
    if (ph, pw) != (h, w):
        img = F.pad(img, (0, pw - w, 0, ph - h))
    boxes = [(t, l) for t in window_starts(ph, window_size, window_stride)
             for l in window_starts(pw, window_size, window_stride)]
    probs = torch.zeros(n_cls, ph, pw, device=img.device)
    counts = torch.zeros(1, ph, pw, device=img.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        crops = torch.stack([img[:, t:t + window_size, l:l + window_size] for t, l in chunk])
        out = model(crops).float().softmax(dim=1)
        for (t, l), p in zip(chunk, out):
            probs[:, t:t + window_size, l:l + window_size] += p
            counts[:, t:t + window_size, l:l + window_size] += 1
    return (probs / counts)[:, :h, :w]
