"""The mask methods: one class each, behind one small interface, and a registry by name.

``patches`` is the paper's random token dropping. The three segment methods hide one SAM segment
``m`` (1 = hidden) of the image ``x``; with ``v = 1 - m``:

- ``segments``:      the encoder sees ``x * v`` (3 channels), every token.
- ``four_channels``: the encoder sees ``concat(x * v, v)`` (4 channels), every token.
- ``preencoder``:    ``concat(x * v, v)`` goes through a learned pre-encoder to 3 channels.

For the segment methods the loss is on the hidden pixels only (``--seg_loss pixel``, the default):
``sum(m * e) / sum(m)`` over every hidden pixel and channel, ``e`` the squared error against the
target. ``--seg_loss patch`` keeps the older per-patch form: each patch's mean error weighted by
the fraction of its pixels that are hidden.

A new method is one subclass of ``MaskMethod`` passed to ``register``: the model, the training
loop, the command lines, checkpoint adaptation and the pictures ask it what to do.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from run.flags import coverage_ratio_type

SEG_LOSSES = ("pixel", "patch")


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


class MaskMethod:
    """What one mask method does, everywhere it matters. The defaults are a segment method that
    feeds the encoder every token of ``x * v`` and has its loss on the hidden pixels."""

    name = ""
    needs_segment = True  # reads a SAM segment per image (a masks/ folder); uses --coverage_ratio
    drops_tokens = False  # the encoder sees only the kept tokens (and the decoder gets mask tokens)
    mask_channels = 0  # channels added to the image for the encoder (the visibility v)
    hidden_label = "SAM segment"  # what the pictures call the hidden part
    # the flags of this method that define a run: a resume keeps the checkpoint's, a different one
    # given on the command line is refused (the model's own flags are listed by main_pretrain)
    run_flags = ("coverage_ratio", "seg_loss")

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
                    seg_mask: torch.Tensor | None, patch_size: int):
        """(tokens the encoder sees, per-patch hidden fraction (N, L), ids_restore or None)."""
        return tokens, patch_loss_weights(seg_mask, patch_size), None

    def loss_weights(self, mask: torch.Tensor, seg_mask: torch.Tensor | None, seg_loss: str,
                     patchify: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What the loss weighs each squared error with: the patchified hidden pixels (N, L, p*p)
        for the loss on hidden pixels only (seg_loss 'pixel'), or the per-patch mask (N, L)."""
        if seg_loss == "pixel":
            return patchify(as_nchw(seg_mask).float())
        return mask

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


class Patches(MaskMethod):
    """The paper's MAE: a random --mask_ratio of the patch tokens is dropped."""

    name = "patches"
    needs_segment = False
    drops_tokens = True
    hidden_label = "dropped patches"
    run_flags = ("mask_ratio",)

    def encoder_input(self, imgs, seg_mask):
        return imgs

    def hide_tokens(self, tokens, mask_ratio, noise, seg_mask, patch_size):
        return random_masking(tokens, mask_ratio, noise)

    def loss_weights(self, mask, seg_mask, seg_loss, patchify):
        return mask  # the dropped patches, as the reference


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
    run_flags = ("coverage_ratio", "seg_loss", "mask_ratio")  # seg_loss: recorded as before, unused
    COVERED = 0.5

    def encoder_input(self, imgs, seg_mask):
        if seg_mask is None:
            raise ValueError(f"mask_method={self.name!r} needs seg_mask (N, 1, H, W) with 1 = hidden")
        return imgs

    def hide_tokens(self, tokens, mask_ratio, noise, seg_mask, patch_size):
        coverage = patch_loss_weights(seg_mask, patch_size)
        if noise is None:
            noise = content_noise(coverage, patch_size)
        # dropped: the largest keys. Coverage is a multiple of 1/p^2; the noise, smaller than that
        # step, orders equal coverages (above all the uncovered patches) at random
        key = coverage + noise.to(coverage.dtype) * (0.5 / patch_size ** 2)
        return random_masking(tokens, mask_ratio, noise=key)

    def loss_weights(self, mask, seg_mask, seg_loss, patchify):
        return mask

    def fill_part(self, mask, seg_mask):
        return mask * (patch_coverage(mask, seg_mask) < self.COVERED)

    def batch_stats(self, mask, seg_mask):
        """hidden_segment: the share of the dropped patches that are the segment's; the rest, the
        fill (patches it only touches, then random ones)."""
        fill = self.fill_part(mask, seg_mask).sum()
        return {"hidden_segment": 1.0 - fill / mask.sum().clamp_min(1.0)}


REGISTRY: dict[str, MaskMethod] = {}
MASK_METHODS: list[str] = []  # the names, in registration order (argparse choices: kept up to date)


def register(method_class: type[MaskMethod]) -> type[MaskMethod]:
    """Adds a method under its name (usable as a class decorator)."""
    if not method_class.name:
        raise ValueError(f"{method_class.__name__} has no name")
    REGISTRY[method_class.name] = method_class()
    if method_class.name not in MASK_METHODS:
        MASK_METHODS.append(method_class.name)
    return method_class


for _cls in (Patches, Segments, FourChannels, PreEncoderMethod, SegmentTokens):
    register(_cls)


def get_method(name: str) -> MaskMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown mask_method {name!r}; choose one of {', '.join(MASK_METHODS)}")
    return REGISTRY[name]


def check_mask_method(mask_method: str) -> str:
    return get_method(mask_method).name


def uses_segments(mask_method: str) -> bool:
    """True when the method needs a SAM segment per image (and so a masks/ folder)."""
    return get_method(mask_method).needs_segment


def encoder_in_chans(mask_method: str, img_chans: int = 3) -> int:
    """Channels of the encoder's patch embedding for a method (a mask channel adds one)."""
    return get_method(mask_method).encoder_in_chans(img_chans)


def visible_input(imgs: torch.Tensor, seg_mask: torch.Tensor, mask_method: str) -> torch.Tensor:
    """What a segment method feeds the encoder (or the pre-encoder): ``x * v``, or
    ``concat(x * v, v)`` for methods with a mask channel."""
    method = get_method(mask_method)
    if not method.needs_segment:
        raise ValueError(f"visible_input is for segment methods, not {mask_method!r}")
    return method.encoder_input(imgs, seg_mask)


DEFAULT_COVERAGE_RATIO = 50.0  # percent of the image the hidden segment should cover


def add_method_args(parser: argparse.ArgumentParser, default_method: str | None = "patches"):
    parser.add_argument('--mask_method', default=default_method, choices=MASK_METHODS,
                        help='patches: random patch dropping (MAE); segments: hide one SAM segment; '
                             'four_channels: hide it and add the visibility as a 4th channel; '
                             'preencoder: a learned pre-encoder maps image + visibility to 3 channels')
    parser.add_argument('--coverage_ratio', default=DEFAULT_COVERAGE_RATIO, type=coverage_ratio_type,
                        help='percent of the image the hidden SAM segment should cover: the annotation '
                             'whose coverage is closest is used (segment methods only)')
    parser.add_argument('--seg_loss', default='pixel', choices=SEG_LOSSES,
                        help='segment methods: pixel = mean squared error over the hidden pixels only '
                             '(sum(m * e) / sum(m)); patch = the older per-patch form (hidden fraction of a '
                             'patch times its mean error over all its pixels), for ablations')
    return parser
