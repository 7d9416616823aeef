"""What each mask method hides and what the model reconstructs, as labelled image grids.

Columns (PANEL_TITLES): original | what the encoder sees (hidden part grey) | visibility (white:
visible, black: hidden: the dropped patches or the segment, named after what made it) |
reconstruction | reconstruction pasted into the hidden part of the original. One row per image,
labelled. Without a model (``mask_panels``) the first three columns alone: what a mask method
would hide, before any pretraining.
"""
from __future__ import annotations

import functools
import os
import unicodedata

import torch
from PIL import Image, ImageDraw, ImageFont

from inputs.transforms import NORMALIZATIONS
from mask_methods import MaskMethod, as_nchw, get_method

PANEL_TITLES = ("original", "encoder input (hidden: grey)", "white: visible, black: {what}", "reconstruction",
                "pasted into hidden part")


def denormalize(x: torch.Tensor, normalization: str = "imagenet") -> torch.Tensor:
    """Normalised images back to [0, 1], with the statistics they were normalised by (--normalization)."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in NORMALIZATIONS[normalization])
    return (x * std + mean).clamp(0, 1)


FILL_COLOUR = (0.85, 0.1, 0.1)  # hidden patches that are not the segment's (token-dropping segment methods)


def _view_panels(method, imgs: torch.Tensor, seg_mask: torch.Tensor | None, hidden: torch.Tensor,
                 fill: torch.Tensor | None = None, normalization: str = "imagenet") -> list:
    """original | encoder input with the hidden part grey | visibility (white visible, black hidden,
    red the fill of a method that hides more than the segment)."""
    seen = denormalize(method.shown_input(imgs, seg_mask), normalization) * (1 - hidden) + 0.5 * hidden
    visibility = (1 - hidden).expand(-1, 3, -1, -1)
    if fill is not None:
        colour = torch.tensor(FILL_COLOUR, device=imgs.device).view(1, 3, 1, 1)
        visibility = visibility * (1 - fill) + colour * fill
    return [denormalize(imgs, normalization), seen, visibility]


def _patch_map(per_patch: torch.Tensor, patch_size: int, h: int, w: int) -> torch.Tensor:
    """(N, L) per-patch values -> (N, 1, H, W) on the image grid."""
    grid = per_patch.reshape(per_patch.shape[0], 1, h // patch_size, w // patch_size)
    return grid.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


def _hidden_maps(method, weights: torch.Tensor, seg_mask: torch.Tensor | None, patch_size: int, hw) -> tuple:
    """(hidden, fill) on the image grid: dropped patches (their fill part apart), or the segment."""
    if not method.drops_tokens:
        return as_nchw(seg_mask).float(), None
    fill = method.fill_part(weights.float(), seg_mask) if seg_mask is not None else None
    return (_patch_map(weights.float(), patch_size, *hw),
            _patch_map(fill, patch_size, *hw) if fill is not None else None)


@torch.no_grad()
def reconstruction_panels(model, imgs: torch.Tensor, seg_mask: torch.Tensor | None = None,
                          mask_ratio: float = 0.75, normalization: str = "imagenet") -> torch.Tensor:
    """(N, 3, H, W) normalised images -> (N, P, 3, H, W) panels in [0, 1]."""
    model.eval()
    _, pred, weights = model(imgs, mask_ratio=mask_ratio, seg_mask=seg_mask)
    if model.norm_pix_loss:  # predictions are per-patch normalised: bring back the patch statistics
        target = model.patchify(imgs)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** .5 + mean
    recon = model.unpatchify(pred.float())
    hidden, fill = _hidden_maps(model.method, weights, seg_mask, model.patch_size, imgs.shape[-2:])
    panels = _view_panels(model.method, imgs, seg_mask, hidden, fill, normalization)
    panels += [denormalize(recon, normalization), denormalize(imgs * (1 - hidden) + recon * hidden, normalization)]
    return torch.stack(panels, dim=1)


@torch.no_grad()
def as_method(mask_method: str | MaskMethod) -> MaskMethod:
    """A method given by name (its flags at their defaults) or as built (its flags as set)."""
    return get_method(mask_method) if isinstance(mask_method, str) else mask_method


def mask_panels(mask_method: str | MaskMethod, imgs: torch.Tensor, seg_mask: torch.Tensor | None = None,
                mask_ratio: float = 0.75, patch_size: int = 16, normalization: str = "imagenet") -> torch.Tensor:
    """Without a model: (N, 3, 3, H, W) panels of what ``mask_method`` hides (the first three
    columns of PANEL_TITLES); a token-dropping method draws its patches (seeded by torch)."""
    method = as_method(mask_method)
    weights = None
    if method.drops_tokens:
        n, _, h, w = imgs.shape
        grid = (h // patch_size, w // patch_size)
        tokens = imgs.new_zeros(n, grid[0] * grid[1], 1)
        _, weights, _ = method.hide_tokens(tokens, mask_ratio, None, seg_mask, patch_size, grid)
    hidden, fill = _hidden_maps(method, weights, seg_mask, patch_size, imgs.shape[-2:])
    return torch.stack(_view_panels(method, imgs, seg_mask, hidden, fill, normalization), dim=1)


def panel_titles(mask_method: str | MaskMethod, generator: str | None = None,
                 coverage: float | None = None) -> list[str]:
    """Column titles; ``generator`` (what made a segment method's masks, e.g. 'SAM 2 hiera_large')
    and the target ``coverage`` (percent) name the hidden part, as the method's segment choice
    picks it."""
    method = as_method(mask_method)
    what = method.hidden_label
    if generator and method.needs_segment:
        choice = getattr(method, "segment_choice", "closest")
        if choice == "closest":
            what = f"{generator} segment" + (f" (closest to {coverage:g}%)" if coverage is not None else "")
        elif choice == "random":
            what = f"a random {generator} segment"
        else:
            order = "smallest first" if choice == "union_smallest" else "in random order"
            what = f"whole {generator} segments ({order}) up to {method.mask_ratio:.0%}"
        if method.drops_tokens:
            what = f"patches of the {what}, red: random fill"
    return [t.format(what=what) for t in PANEL_TITLES]


@functools.lru_cache(maxsize=1)  # one font file opened per process, not per grid
def _unicode_font():
    """(path, FT2Font) of a TrueType font with wide coverage (matplotlib's DejaVu Sans), or None."""
    try:
        import matplotlib
        from matplotlib.ft2font import FT2Font
        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
        return path, FT2Font(path)
    except (ImportError, OSError, RuntimeError):
        return None


def legible(text: str, has_glyph=None) -> str:
    """``text`` with every character the font cannot draw written as its escape (\\u732b), so that a
    file name never shows as empty boxes."""
    has_glyph = has_glyph or (lambda c: c.isascii())
    out = []
    for c in unicodedata.normalize("NFC", text):
        out.append(c if c.isprintable() and has_glyph(c) else c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def legible_text(text: str) -> str:
    """``text`` as matplotlib's and the grids' font (DejaVu Sans) can draw it: a character it has no
    glyph for (a CJK file name) written as its escape, not as a box."""
    found = _unicode_font()
    return legible(text, (lambda c: found[1].get_char_index(ord(c)) != 0) if found is not None else None)


FRAME_COLOUR = (128, 128, 128)  # a panel's outline: white on the white page still shows where it ends


def _wrap(text: str, width: int, width_of) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and width_of(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(panels: torch.Tensor, titles: list[str], row_labels: list[str], min_panel: int = 224,
                  pad: int = 4) -> Image.Image:
    """(N, P, 3, H, W) panels in [0, 1] -> a PIL image: a title above each column, a label left of
    each row, every panel upscaled (nearest, so pixels stay visible) to at least min_panel px and
    framed in grey (a white visibility panel on the white page)."""
    n, p, _, h, w = panels.shape
    scale = max(1, -(-min_panel // min(h, w)))  # ceil
    ph, pw = h * scale, w * scale
    size = max(12, pw // 14)
    found, font, has_glyph = _unicode_font(), None, None  # without it: Pillow's font, non-ASCII escaped
    if found is not None:
        try:
            font = ImageFont.truetype(found[0], size)
            has_glyph = lambda c: found[1].get_char_index(ord(c)) != 0  # noqa: E731
        except (OSError, ImportError):  # a Pillow built without FreeType
            pass
    if font is None:
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            font = ImageFont.load_default()
    titles = [legible(t, has_glyph) for t in titles]
    row_labels = [legible(t, has_glyph) for t in row_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width_of = lambda t: measure.textbbox((0, 0), t, font=font)[2]  # noqa: E731
    wrapped = [_wrap(t, pw, width_of) for t in titles[:p]]
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    text_h = max(len(lines) for lines in wrapped) * line_h + 2 * pad
    label_w = max(width_of(t) for t in row_labels) + 2 * pad
    grid = Image.new("RGB", (label_w + p * (pw + pad), text_h + n * (ph + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            x = label_w + j * (pw + pad) + max(0, (pw - width_of(line)) // 2)
            draw.text((x, pad + k * line_h), line, fill="black", font=font)
    for i in range(n):
        y = text_h + i * (ph + pad)
        draw.text((pad, y + ph // 2 - text_h // 2), row_labels[i], fill="black", font=font)
        for j in range(p):
            arr = (panels[i, j].float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            x = label_w + j * (pw + pad)
            grid.paste(Image.fromarray(arr).resize((pw, ph), Image.NEAREST), (x, y))
            draw.rectangle((x - 1, y - 1, x + pw, y + ph), outline=FRAME_COLOUR)  # in the padding, around it
    return grid
