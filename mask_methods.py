"""The mask methods: one class each, behind one interface, and a registry by name.

A method decides everything that differs between ways of hiding: its own flags, which SAM
segment(s) of an image it hides, what the encoder sees, which tokens it keeps, what the loss
weighs. The model (models_mae.py), the loader, the command lines, checkpoint adaptation and the
pictures ask it; a new method is one subclass here passed to ``register`` (a method with its own
flag and its own segment choice included).

``patches`` is the paper's random token dropping. The three segment methods hide one SAM segment
``m`` (1 = hidden) of the image ``x``; with ``v = 1 - m``:

- ``segments``:       the encoder sees ``x * v`` (3 channels), every token.
- ``four_channels``:  the encoder sees ``concat(x * v, v)`` (4 channels), every token.
- ``preencoder``:     ``concat(x * v, v)`` goes through a learned pre-encoder to 3 channels.
- ``segment_tokens``: MAE's token dropping, the segment's patches first.

For the first three the loss is on the hidden pixels only (``--seg_loss pixel``, the default):
``sum(m * e) / sum(m)`` over every hidden pixel and channel, ``e`` the squared error against the
target. ``--seg_loss patch`` keeps the older per-patch form: each patch's mean error weighted by
the fraction of its pixels that are hidden. The segment is the one whose coverage is closest to
``--coverage_ratio`` percent.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from run.flags import coverage_ratio_type, mask_ratio_type, positive_float, positive_int
from sam.files import MaskFileError
from sam.layouts import ImageSegments, closest, segment_mask

SEG_LOSSES = ("pixel", "patch")


@dataclass(frozen=True)
class Flag:
    """A method's own command-line flag: added to the parser from the class, recorded in every
    checkpoint, reconciled when a run resumes, part of a benchmark run's identity. Methods that
    share a flag share its declaration."""
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple | None = None
    before: Any = None  # its value in this repo's checkpoints written before the flag existed


MASK_RATIO = Flag("mask_ratio", mask_ratio_type, 0.75, "fraction of the patch tokens dropped")
COVERAGE_RATIO = Flag("coverage_ratio", coverage_ratio_type, 50.0,
                      "percent of the image the hidden SAM segment should cover: the segment whose coverage "
                      "is closest is hidden")
SEG_LOSS = Flag("seg_loss", str, "pixel", "pixel: mean squared error over the hidden pixels only (sum(m * e) / "
                "sum(m)); patch: the older per-patch form (hidden fraction of a patch times its mean error over "
                "all its pixels), for ablations", choices=SEG_LOSSES, before="patch")
SEGMENT_CHOICES = ("closest", "random", "union", "union_smallest")
SEGMENT_CHOICE = Flag("segment_choice", str, "closest",
                      "which SAM segments of an image are hidden: closest: the one whose coverage is closest to "
                      "--coverage_ratio (the same every epoch); random: one drawn per sample and epoch; union, "
                      "union_smallest (token-dropping methods): whole segments, in random order or smallest first, "
                      "until --mask_ratio of the image is covered", choices=SEGMENT_CHOICES, before="closest")
BLOCK_SIZE = Flag("block_size", positive_int, 4, "blocks: the side K of the K x K groups of patches dropped together "
                  "(1: patches)")
BLOCKWISE_MIN = Flag("blockwise_min_patches", positive_int, 16, "blockwise: the smallest area of a rectangle, in "
                     "patches (BEiT's 16)")
BLOCKWISE_ASPECT = Flag("blockwise_aspect", positive_float, 0.3, "blockwise: a rectangle's aspect ratio is drawn "
                        "log-uniformly from [a, 1/a] (BEiT's 0.3)")
NOISE_FILTER = Flag("noise_filter", str, "green", "noise: the filter of the random field whose highest values are "
                    "dropped: green (band-pass, ColorMAE's best), blue (high-pass), red (low-pass), purple "
                    "(band-stop), white (none: random patches)", choices=("green", "blue", "red", "purple", "white"))


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


def as_nchw(seg_mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) -> (N, 1, H, W)."""
    return seg_mask.unsqueeze(1) if seg_mask.dim() == 3 else seg_mask


def patch_loss_weights(seg_mask: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Hidden fraction of every patch: (N, [1,] H, W) -> (N, L) in row-major patch order."""
    return F.avg_pool2d(as_nchw(seg_mask).float(), kernel_size=patch_size, stride=patch_size).flatten(1)


def patchified_mask(seg_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, [1,] H, W) -> (N, L, p*p): each patch's pixels in the order of models_mae's patchify."""
    m = as_nchw(seg_mask).float()
    n, _, h, w = m.shape
    p = patch_size
    return m.reshape(n, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(n, (h // p) * (w // p), p * p)


class MaskMethod:
    """What one mask method does, everywhere it matters. The defaults are a segment method that
    hides the segment closest to --coverage_ratio, feeds the encoder every token of ``x * v``, and
    has its loss on the hidden pixels. An instance holds the values of the class's ``flags``."""

    name = ""
    needs_segment = True  # reads SAM segments (a masks/ folder)
    drops_tokens = False  # the encoder sees only the kept tokens (and the decoder gets mask tokens)
    mask_channels = 0  # channels added to the image for the encoder (the visibility v)
    hidden_label = "SAM segment"  # what the pictures call the hidden part
    flags: tuple[Flag, ...] = (COVERAGE_RATIO, SEG_LOSS, SEGMENT_CHOICE)

    def __init__(self, **params):
        unknown = sorted(set(params) - {f.name for f in self.flags})
        if unknown:
            raise ValueError(f"mask_method {self.name!r} has no parameter {', '.join(unknown)}; its flags: "
                             f"{', '.join('--' + f.name for f in self.flags) or 'none'}")
        for flag in self.flags:
            value = params.get(flag.name, flag.default)
            if flag.choices is not None and value not in flag.choices:
                raise ValueError(f"unknown {flag.name} {value!r} for mask_method {self.name!r}; choose one of "
                                 f"{', '.join(map(str, flag.choices))}")
            setattr(self, flag.name, value)
        self.check()

    @classmethod
    def from_args(cls, args) -> "MaskMethod":
        """The method with the values of its flags in ``args`` (parsed flags, or a checkpoint's)."""
        saved = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        return cls(**{f.name: saved[f.name] for f in cls.flags if f.name in saved})

    def params(self) -> dict[str, Any]:
        """The values of the method's flags (recorded in every checkpoint)."""
        return {f.name: getattr(self, f.name) for f in self.flags}

    def check(self) -> None:
        """Raises ValueError for parameter values that would train nothing (or mean nothing)."""
        if getattr(self, "segment_choice", "closest").startswith("union") and not self.drops_tokens:
            raise ValueError(f"--segment_choice {self.segment_choice} adds segments until --mask_ratio is hidden: "
                             f"it is for token-dropping methods (segment_tokens), not {self.name}")

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params().items())})"

    # ---- which pixels of an image are hidden (in the loader's workers) --------------------------
    def hidden_segment(self, segments: ImageSegments, image_size: tuple[int, int],
                       generator: torch.Generator | None = None) -> np.ndarray:
        """The (H, W) uint8 mask (1 = hidden) of one image from its SAM segments (read from any mask
        layout or a tar shard; each decoded only when asked), at the masks' resolution;
        ``image_size`` (W, H) sizes an all-zero mask for an image without segments. ``generator``:
        the sample's own random numbers of this epoch (seeded by seed, epoch and index, so N ranks
        choose as one process). Here, by --segment_choice: the segment closest to --coverage_ratio,
        one drawn at random, or whole segments until --mask_ratio of the image is covered."""
        choice = getattr(self, "segment_choice", "closest")
        if choice == "closest" or not len(segments):
            return segment_mask(closest(segments, self.coverage_ratio), image_size)
        if choice == "union_smallest":
            order = sorted(range(len(segments)), key=lambda i: segments.coverages[i])
        else:
            order = torch.randperm(len(segments), generator=generator).tolist()
        if choice == "random":
            return segment_mask(segments[order[0]], image_size)
        union = None
        for i in order:  # whole segments until the ratio is covered; each decoded only when added
            mask = segment_mask(segments[i], image_size)
            if union is not None and mask.shape != union.shape:
                raise MaskFileError(f"{segments.where}: its segments have different sizes ({union.shape[::-1]} "
                                    f"and {mask.shape[::-1]}): not the masks of one picture. Regenerate them")
            union = mask if union is None else union | mask
            if union.mean() >= self.mask_ratio:
                break
        return union

    def cached_coverage(self) -> float | None:
        """The --coverage_ratio whose compact mask cache (tools/build_mask_cache.py) holds this
        method's choice for every image; None when the cache cannot serve it (masks/ is read)."""
        return self.coverage_ratio if getattr(self, "segment_choice", "closest") == "closest" else None

    # ---- pretraining ----------------------------------------------------------------------------
    def encoder_in_chans(self, img_chans: int = 3) -> int:
        return img_chans + self.mask_channels

    def build_preencoder(self, patch_size: int, img_chans: int) -> nn.Module | None:
        """A module between the encoder input and the patch embedding (dropped downstream)."""
        return None

    def encoder_input(self, imgs: torch.Tensor, seg_mask: torch.Tensor | None) -> torch.Tensor:
        """The image-shaped tensor the (pre-encoder or) patch embedding sees."""
        if seg_mask is None:
            raise ValueError(f"mask_method={self.name!r} needs seg_mask (N, 1, H, W) with 1 = hidden")
        visible = 1.0 - as_nchw(seg_mask).to(imgs.dtype)
        x = imgs * visible
        return torch.cat([x, visible], dim=1) if self.mask_channels else x

    def hide_tokens(self, tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None,
                    seg_mask: torch.Tensor | None, patch_size: int, grid: tuple[int, int] | None = None):
        """(tokens the encoder sees, per-patch hidden fraction (N, L), ids_restore or None).
        tokens: (N, L, D) in row-major order of the (rows, cols) patch ``grid`` (None: square);
        ``noise`` (N, L): given for a reproducible draw, else drawn here; seg_mask: (N, 1, H, W)
        or None."""
        return tokens, patch_loss_weights(seg_mask, patch_size), None

    def loss_weights(self, mask: torch.Tensor, seg_mask: torch.Tensor | None, patch_size: int) -> torch.Tensor:
        """What the loss weighs each patch's squared errors with, (N, L, K): K = 1, one weight per
        patch on the mean of its errors, or K = p*p, one per pixel on the mean over its channels
        (models_mae.forward_loss: sum(w * e) / sum(w)). Here: the hidden pixels (--seg_loss
        pixel), or each patch's hidden fraction (--seg_loss patch)."""
        if self.seg_loss == "pixel":
            return patchified_mask(seg_mask, patch_size)
        return mask.unsqueeze(-1)

    # ---- downstream -----------------------------------------------------------------------------
    def downstream_in_chans(self, fold_mask_channel: bool, img_chans: int = 3) -> int:
        """Input channels of a downstream encoder: the mask channels, fed constant 1 (nothing
        hidden), are kept or folded into the patch embedding's bias."""
        return img_chans if fold_mask_channel else self.encoder_in_chans(img_chans)

    def adapt_patch_embed(self, weight: torch.Tensor, bias: torch.Tensor, fold_mask_channel: bool):
        """The pretrained patch embedding for a downstream model: with the mask channels constant
        1, their kernel only adds its sum to the bias (exact)."""
        if not fold_mask_channel or weight.shape[1] <= 3:
            return weight, bias
        return weight[:, :3].contiguous(), bias + weight[:, 3:].sum(dim=(1, 2, 3))

    def stack_patch_embed(self, official: torch.Tensor, target_chans: int) -> torch.Tensor:
        """An official 3-channel kernel for this method's patch embedding: the mask channels start
        at zero weight, so with nothing hidden the first forward equals the official model's."""
        extra = target_chans - official.shape[1]
        return torch.cat([official, official.new_zeros(official.shape[0], extra, *official.shape[2:])], dim=1) \
            if extra > 0 else official

    def batch_stats(self, mask: torch.Tensor, seg_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Extra per-batch numbers for the log and TensorBoard (device tensors: no sync)."""
        return {}

    # ---- pictures -------------------------------------------------------------------------------
    def shown_input(self, imgs: torch.Tensor, seg_mask: torch.Tensor | None) -> torch.Tensor:
        """The encoder's image input for a picture (3 channels; the mask channels are drawn apart)."""
        return self.encoder_input(imgs, seg_mask)[:, :imgs.shape[1]]

    def fill_part(self, mask: torch.Tensor, seg_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(N, L) 1 where a hidden patch is not the segment's (drawn in another colour), or None."""
        return None


def _check_mask_ratio(method: MaskMethod) -> None:
    if method.mask_ratio == 0:
        raise ValueError("--mask_ratio 0 hides no patch: the loss is 0 and nothing is learned; use e.g. 0.75")


class Patches(MaskMethod):
    """The paper's MAE: a random --mask_ratio of the patch tokens is dropped."""

    name = "patches"
    needs_segment = False
    drops_tokens = True
    hidden_label = "dropped patches"
    flags = (MASK_RATIO,)

    def check(self):
        _check_mask_ratio(self)

    def cached_coverage(self):
        return None

    def encoder_input(self, imgs, seg_mask):
        return imgs

    def hide_tokens(self, tokens, mask_ratio, noise, seg_mask, patch_size, grid=None):
        return random_masking(tokens, mask_ratio, noise)

    def loss_weights(self, mask, seg_mask, patch_size):
        return mask.unsqueeze(-1)  # the dropped patches, as the reference


class Segments(MaskMethod):
    """The encoder sees x * v: the segment blacked out, every token kept."""

    name = "segments"


class FourChannels(MaskMethod):
    """The encoder sees concat(x * v, v): it knows what is missing rather than seeing black."""

    name = "four_channels"
    mask_channels = 1


class PreEncoder(nn.Module):
    """Conv2d(in, out*p*p, kernel=stride=p) + PixelShuffle(p): a learned per-patch map from
    ``concat(x * v, v)`` back to an image-shaped input. Starts as identity on the image channels
    and zero on the mask channel, so at initialisation the ViT sees exactly ``x * v``."""

    def __init__(self, patch_size: int, in_chans: int = 4, out_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.out_chans = out_chans
        self.proj = nn.Conv2d(in_chans, out_chans * patch_size ** 2, kernel_size=patch_size, stride=patch_size)
        self.shuffle = nn.PixelShuffle(patch_size)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        p = self.patch_size
        self.proj.weight.zero_()
        self.proj.bias.zero_()
        # PixelShuffle sends channel c*p*p + i*p + j to channel c, pixel (i, j) of each p x p block.
        for c in range(self.out_chans):
            for i in range(p):
                for j in range(p):
                    self.proj.weight[c * p * p + i * p + j, c, i, j] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(x))


class PreEncoderMethod(MaskMethod):
    """concat(x * v, v) through a learned per-patch pre-encoder back to 3 channels."""

    name = "preencoder"
    mask_channels = 1

    def encoder_in_chans(self, img_chans: int = 3) -> int:
        return img_chans  # the pre-encoder maps image + visibility back to the image's channels

    def downstream_in_chans(self, fold_mask_channel: bool, img_chans: int = 3) -> int:
        return img_chans

    def build_preencoder(self, patch_size, img_chans):
        return PreEncoder(patch_size, img_chans + 1, img_chans)


def patch_coverage(mask: torch.Tensor, seg_mask: torch.Tensor) -> torch.Tensor:
    """(N, L) fraction of each patch that the segment covers, the patch size read off the shapes."""
    seg = as_nchw(seg_mask)
    patch = round((seg.shape[-2] * seg.shape[-1] / mask.shape[1]) ** 0.5)
    return patch_loss_weights(seg, patch)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) of int64 values, elementwise; wraps exactly."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def content_noise(coverage: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, L) uniform-looking noise in [0, 1) that is a function of each sample's segment layout:
    the same sample gets the same fill on any rank and in any batch (two ranks train exactly as
    one process), another crop of it (the next epoch) another fill. Integer arithmetic only."""
    counts = (coverage * patch_size ** 2).round().long()  # covered pixels per patch, exact
    position = torch.arange(coverage.shape[1], device=coverage.device)
    sample = (counts * (_mix32(position + 1) + 1)).sum(dim=1, keepdim=True)
    return _mix32(_mix32(sample) + position * 0x9E3779B9).double().div(2.0 ** 32).to(coverage.dtype)


class SegmentTokens(MaskMethod):
    """MAE's token dropping with SAM's masks: exactly --mask_ratio of the tokens are dropped, the
    segment's patches first (most covered first), then the patches it touches, then random ones
    only where the segment has no more area. A patch counts as the segment's from COVERED of its
    pixels. The encoder sees only the kept tokens, as for ``patches`` (the same gather, decoder and
    ids_restore), so a step costs what a ``patches`` step costs; the loss is on the dropped
    patches, every pixel of which the encoder did not see."""

    name = "segment_tokens"
    drops_tokens = True
    hidden_label = "patches of the SAM segment, red: random fill"
    flags = (COVERAGE_RATIO, SEG_LOSS, MASK_RATIO, SEGMENT_CHOICE)  # seg_loss: recorded as before, unused
    COVERED = 0.5

    def check(self):
        _check_mask_ratio(self)

    def encoder_input(self, imgs, seg_mask):
        if seg_mask is None:
            raise ValueError(f"mask_method={self.name!r} needs seg_mask (N, 1, H, W) with 1 = hidden")
        return imgs

    def hide_tokens(self, tokens, mask_ratio, noise, seg_mask, patch_size, grid=None):
        coverage = patch_loss_weights(seg_mask, patch_size)
        if noise is None:
            noise = content_noise(coverage, patch_size)
        # dropped: the largest keys. Coverage is a multiple of 1/p^2; the noise, smaller than that
        # step, orders equal coverages (above all the uncovered patches) at random
        key = coverage + noise.to(coverage.dtype) * (0.5 / patch_size ** 2)
        return random_masking(tokens, mask_ratio, noise=key)

    def loss_weights(self, mask, seg_mask, patch_size):
        return mask.unsqueeze(-1)

    def fill_part(self, mask, seg_mask):
        return mask * (patch_coverage(mask, seg_mask) < self.COVERED)

    def batch_stats(self, mask, seg_mask):
        """hidden_segment: the share of the dropped patches that are the segment's; the rest, the
        fill (patches it only touches, then random ones)."""
        fill = self.fill_part(mask, seg_mask).sum()
        return {"hidden_segment": 1.0 - fill / mask.sum().clamp_min(1.0)}


# ------------------------------------------------------------------------------------------------
# the masking baselines a SAM method is compared with: token dropping by other rules

class TokenMethod(Patches):
    """A method that drops exactly --mask_ratio of the tokens (every sample the same number, as the
    MAE gather needs) by a rule of its own, without SAM masks: everything else is ``patches``', so a
    step costs what a ``patches`` step costs. Subclasses give ``drop_keys``: per token, a key whose
    largest values are dropped."""

    def drop_keys(self, n: int, grid: tuple[int, int], noise: torch.Tensor | None, device) -> torch.Tensor:
        raise NotImplementedError

    def hide_tokens(self, tokens, mask_ratio, noise, seg_mask, patch_size, grid=None):
        n, length, _ = tokens.shape
        grid = grid or (math.isqrt(length), math.isqrt(length))
        return random_masking(tokens, mask_ratio, noise=self.drop_keys(n, grid, noise, tokens.device))


def group_keys(groups: torch.Tensor, group_noise: torch.Tensor, token_noise: torch.Tensor) -> torch.Tensor:
    """Keys that order tokens group by group (by ``group_noise``, (N, G)) and, within a group, by
    ``token_noise`` (N, L): dropping the largest keys drops whole groups and cuts one.
    ``groups``: (L,) each token's group."""
    rank = group_noise.argsort(dim=1).argsort(dim=1).to(token_noise.dtype)  # each group's place
    return rank[:, groups] + token_noise.clamp(0, 1 - 1e-6)


class Blocks(TokenMethod):
    """Whole K x K groups of patches are dropped (Pixio's 4 x 4 block masking; K = 1 is
    ``patches``), groups drawn at random until exactly --mask_ratio of the tokens are dropped; on
    a grid K does not divide the edge groups are smaller, and the last group drawn is cut to hit the
    exact count. With given ``noise`` a group's place is its top-left patch's noise."""

    name = "blocks"
    hidden_label = "dropped blocks of patches"
    flags = (MASK_RATIO, BLOCK_SIZE)

    def drop_keys(self, n, grid, noise, device):
        gh, gw = grid
        k = self.block_size
        rows, cols = torch.arange(gh, device=device), torch.arange(gw, device=device)
        groups = ((rows[:, None] // k) * (-(-gw // k)) + cols[None, :] // k).flatten()  # (L,)
        if noise is None:
            noise = torch.rand(n, gh * gw, device=device)
        first = torch.full((int(groups.max()) + 1,), gh * gw, device=device, dtype=torch.long)
        first = first.scatter_reduce(0, groups, torch.arange(gh * gw, device=device), reduce="amin")
        return group_keys(groups, noise[:, first], noise)


def sample_uniforms(n: int, device, noise: torch.Tensor | None = None):
    """A source of (n,) uniform draws in [0, 1), one per sample per call: torch's generator, or,
    given ``noise`` (N, L), a hash of each sample's noise and the call's number (integer arithmetic:
    the same sample draws the same on any rank and in any batch)."""
    if noise is None:
        return lambda: torch.rand(n, device=device)
    bits = (noise.double() * 2.0 ** 24).long()
    position = torch.arange(noise.shape[1], device=noise.device)
    seeds = _mix32((bits * (_mix32(position + 1) + 1)).sum(dim=1))
    calls = iter(range(1, 1 << 30))
    return lambda: _mix32(seeds + next(calls) * 0x9E3779B9).double().div(2.0 ** 32).float()


class Blockwise(TokenMethod):
    """BEiT's blockwise masking: random rectangles of at least --blockwise_min_patches patches and an
    aspect ratio drawn log-uniformly from [a, 1/a] are added until --mask_ratio of the tokens are
    covered (one rectangle per sample per round, all samples at once on the device), then trimmed
    or filled at random to exactly that count. Given ``noise`` (N, L), every draw is a function of
    each sample's noise, so the same samples get the same rectangles on any number of ranks."""

    name = "blockwise"
    hidden_label = "dropped rectangles of patches"
    flags = (MASK_RATIO, BLOCKWISE_MIN, BLOCKWISE_ASPECT)
    ROUNDS = 64  # rectangles tried per sample at most; a sample still short is filled at random

    def check(self):
        super().check()
        if not 0 < self.blockwise_aspect <= 1:
            raise ValueError(f"--blockwise_aspect must be in (0, 1]: the range is [a, 1/a], got {self.blockwise_aspect}")

    def drop_keys(self, n, grid, noise, device):
        # drawn on the CPU: the rounds stop when every sample is covered, a check that would make
        # the GPU wait once per round (~30 rounds at 14 x 14); 22 ms per 256 samples on one core,
        # done while the GPU runs the previous step's kernels
        cpu = torch.device("cpu")
        covered, _ = self.rectangles(n, grid, cpu, noise.to(cpu) if noise is not None else None)
        # from pinned memory the copy to a GPU is queued, not waited for
        covered = covered.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else covered.to(device)
        if noise is None:
            noise = torch.rand(n, grid[0] * grid[1], device=device)
        # the covered tokens first (at random among them), then random ones: exactly the count dropped
        return covered.flatten(1).to(noise.dtype) + noise.clamp(0, 1 - 1e-6)

    def rectangles(self, n: int, grid: tuple[int, int], device,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
        """(n, rows, cols) the patches covered by the rectangles, and each round's draws (area,
        aspect, then top, left, h, w as placed; ``added``: the samples that took it)."""
        uniform = sample_uniforms(n, device, noise)
        gh, gw = grid
        target = gh * gw - int(gh * gw * (1 - self.mask_ratio))  # what random_masking drops
        covered = torch.zeros(n, gh, gw, dtype=torch.bool, device=device)
        rows = torch.arange(gh, device=device).view(1, gh, 1)
        cols = torch.arange(gw, device=device).view(1, 1, gw)
        log_aspect = math.log(self.blockwise_aspect)
        low = min(self.blockwise_min_patches, target)
        rounds = []
        for _ in range(self.ROUNDS):
            short = covered.flatten(1).sum(1) < target
            if not short.any():
                break
            remaining = (target - covered.flatten(1).sum(1)).clamp_min(low)
            area = low + uniform() * (remaining - low)
            aspect = torch.exp(log_aspect * (1 - 2 * uniform()))
            h = (area * aspect).sqrt().round().clamp(1, gh).long()
            w = (area / aspect).sqrt().round().clamp(1, gw).long()
            top = (uniform() * (gh - h + 1)).long()
            left = (uniform() * (gw - w + 1)).long()
            rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                    & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
            covered |= rect & short.view(-1, 1, 1)
            rounds.append({"area": area, "aspect": aspect, "top": top, "left": left, "h": h, "w": w, "added": short})
        return covered, rounds


def noise_field_filter(size: tuple[int, int], kind: str, device) -> torch.Tensor:
    """The frequency response (rfft2 layout) of a noise colour on a field of ``size``: Gaussian
    low-pass (red) and its complement (blue), their difference of two widths, a band-pass (green),
    and its complement (purple); white passes all. Widths in cycles per token."""
    fy = torch.fft.fftfreq(size[0], device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(size[1], device=device).view(1, -1)
    f2 = fy ** 2 + fx ** 2

    def low(cutoff: float) -> torch.Tensor:
        return torch.exp(-f2 / (2 * cutoff ** 2))
    band = low(0.16) - low(0.06)  # mid frequencies: clusters of a few tokens
    return {"white": torch.ones_like(f2), "red": low(0.06), "blue": 1 - low(0.16), "green": band,
            "purple": 1 - band}[kind]


class Noise(TokenMethod):
    """ColorMAE's data-independent masks: a random field filtered in the frequency domain (green:
    band-pass, its best; blue: high-pass; red: low-pass; purple: band-stop; white: none), one field
    per sample drawn on the device, larger than the token grid so that the filter's band is
    resolved (the grid is a window of it); the --mask_ratio highest values of each sample's grid
    are dropped. Given ``noise`` (N, L), that is the white field, filtered at the grid's size."""

    name = "noise"
    hidden_label = "dropped patches (filtered noise)"
    flags = (MASK_RATIO, NOISE_FILTER)
    FIELD = 64  # side of the generated field (at least twice the grid's)

    def drop_keys(self, n, grid, noise, device):
        gh, gw = grid
        filtered = self.field(noise.view(n, gh, gw).float() if noise is not None else None, n, grid, device)
        ranks = filtered[:, :gh, :gw].flatten(1).argsort(dim=1).argsort(dim=1)
        return ranks.float() / (gh * gw)  # order-preserving, in [0, 1)

    def field(self, white: torch.Tensor | None, n: int, grid: tuple[int, int], device) -> torch.Tensor:
        """(n, H, W) filtered fields: of ``white`` if given, else of new uniform noise FIELD wide."""
        if white is None:
            side = max(self.FIELD, 2 * grid[0], 2 * grid[1])
            white = torch.rand(n, side, side, device=device)
        response = noise_field_filter(white.shape[-2:], self.noise_filter, white.device)
        return torch.fft.irfft2(torch.fft.rfft2(white) * response, s=white.shape[-2:])


# ------------------------------------------------------------------------------------------------
# the registry and the command line

REGISTRY: dict[str, type[MaskMethod]] = {}
MASK_METHODS: list[str] = []  # the names, in registration order (argparse choices: kept up to date)


def register(method_class: type[MaskMethod]) -> type[MaskMethod]:
    """Adds a method under its name (usable as a class decorator). A flag it shares with another
    method must be declared the same way."""
    if not method_class.name:
        raise ValueError(f"{method_class.__name__} has no name")
    for flag in method_class.flags:
        other = method_flags().get(flag.name)
        if other is not None and other != flag:
            raise ValueError(f"{method_class.__name__} declares --{flag.name} unlike the methods before it")
    REGISTRY[method_class.name] = method_class
    if method_class.name not in MASK_METHODS:
        MASK_METHODS.append(method_class.name)
    return method_class


def method_class(name: str) -> type[MaskMethod]:
    if name not in REGISTRY:
        raise ValueError(f"unknown mask_method {name!r}; choose one of {', '.join(MASK_METHODS)}")
    return REGISTRY[name]


def get_method(name: str, **params) -> MaskMethod:
    """The method ``name`` with these parameters (the others at their defaults)."""
    return method_class(name)(**params)


def build_method(args) -> MaskMethod:
    """The method of --mask_method with the values of its flags (parsed flags or a checkpoint's)."""
    saved = vars(args) if isinstance(args, argparse.Namespace) else args
    return method_class(saved.get("mask_method") or "patches").from_args(saved)


def uses_segments(mask_method: str) -> bool:
    """True when the method needs SAM segments (and so a masks/ folder)."""
    return method_class(mask_method).needs_segment


def method_flags() -> dict[str, Flag]:
    """Every registered method's flags, by name."""
    return {f.name: f for cls in REGISTRY.values() for f in cls.flags}


for _cls in (Patches, Segments, FourChannels, PreEncoderMethod, SegmentTokens, Blocks, Blockwise, Noise):
    register(_cls)


def add_method_args(parser: argparse.ArgumentParser, default_method: str | None = "patches") -> None:
    """--mask_method and the flags of every registered method."""
    parser.add_argument('--mask_method', default=default_method, choices=MASK_METHODS,
                        help='patches: random patch dropping (MAE); segments: hide one SAM segment; '
                             'four_channels: hide it and add the visibility as a 4th channel; '
                             'preencoder: a learned pre-encoder maps image + visibility to 3 channels; '
                             'segment_tokens: drop the segment\'s patches, as MAE drops tokens; '
                             'blocks: drop whole KxK groups of patches; blockwise: BEiT\'s random rectangles; '
                             'noise: ColorMAE\'s filtered-noise masks')
    for flag in method_flags().values():
        users = [name for name, cls in REGISTRY.items() if flag in cls.flags]
        parser.add_argument('--' + flag.name, type=flag.type, default=flag.default, choices=flag.choices,
                            help=f"{flag.help} ({', '.join(users)})")


def warn_ignored_flags(args: argparse.Namespace) -> None:
    """A method flag given for a method that does not have it is named once."""
    own = {f.name for f in method_class(args.mask_method).flags}
    for name, flag in method_flags().items():
        if name in getattr(args, "given_flags", ()) and name not in own:
            users = [m for m, cls in REGISTRY.items() if flag in cls.flags]
            print(f"WARNING: --{name} is ignored by --mask_method {args.mask_method} (a flag of "
                  f"{', '.join(users)})", file=sys.stderr)


def visible_input(imgs: torch.Tensor, seg_mask: torch.Tensor, mask_method: str) -> torch.Tensor:
    """What a segment method feeds the encoder (or the pre-encoder): ``x * v``, or
    ``concat(x * v, v)`` for methods with a mask channel."""
    method = get_method(mask_method)
    if not method.needs_segment:
        raise ValueError(f"visible_input is for segment methods, not {mask_method!r}")
    return method.encoder_input(imgs, seg_mask)
