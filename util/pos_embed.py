"""2-D sine-cosine position embeddings (as in MAE / MoCo v3) and their interpolation.

Grids may be rectangular: ``grid_size`` is an int (square) or an ``(h, w)`` pair.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): first half sin, second half cos."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """Returns (h*w [+1], embed_dim) in row-major patch order.

    The first half of the channels encodes the column (x) coordinate and the second half the row
    coordinate: this is the channel order of the official MAE checkpoints.
    """
    assert embed_dim % 4 == 0, "embed_dim must be divisible by 4 for 2-D sin-cos embeddings"
    gh, gw = _as_hw(grid_size)
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate(
        [get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols),
         get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     num_extra_tokens: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Resize a (1, extra + h*w, D) position embedding to a new patch grid (bicubic as the MAE
    reference; the Segmenter's encoder uses bilinear, as Segmenter does)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
