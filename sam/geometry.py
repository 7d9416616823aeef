"""Which masks fit which images. One policy for training, the mask cache, check_dataset.py and
generate_masks.py. The image is always read as the reference MAE reads it (Pillow, EXIF
orientation NOT applied): its stored pixels. A mask (H_m, W_m) for an image of W x H pixels is
  - used as is when it has the image's size;
  - resized (nearest) when it has the image's aspect ratio at another resolution (SAM run on a
    downscaled copy);
  - mapped into the stored pixels' frame by the exact inverse of the image's EXIF orientation
    (2-8), then resized if needed, when it was made on the displayed picture: SAM's scripts/amg.py
    reads images with OpenCV, which applies the orientation;
  - refused (MaskFileError naming the file and both sizes) in every other case, and whenever the
    mask has more than MAX_MASK_PIXELS_PER_IMAGE_PIXEL times the image's pixels (and more than
    4096 x 4096): such a size is checked before anything is decoded, since decoding a crafted
    100000 x 100000 RLE would take 10 GB.

Which frame a mask was made in: its size says so where it can (orientations 5-8 swap width and
height, so on a non-square image only one frame fits); otherwise the frame its layout records
(sam/files.py ``recorded_frame``): amg.py's folders and files converted from them, the displayed
picture; this repo's generator, the stored pixels; SA-1B's files and other unknown makers are
taken as the stored pixels, and tools/check_dataset.py says it cannot tell for them.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from sam.files import DISPLAYED, UNKNOWN, MaskFileError

# what Pillow raises for a file it cannot read, including one over its decompression-bomb limit
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LIMIT_VARIABLE = "PIL_MAX_IMAGE_PIXELS"
if os.environ.get(LIMIT_VARIABLE):  # the user's own choice of Pillow's limit (0: none)
    Image.MAX_IMAGE_PIXELS = int(os.environ[LIMIT_VARIABLE]) or None
EXIF_ORIENTATION_TAG = 0x0112
_T = Image.Transpose
# EXIF orientation -> the transpose that turns the stored pixels into the displayed picture (the
# EXIF specification; what Pillow's exif_transpose and OpenCV's imread apply)
STORED_TO_DISPLAYED = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
                       6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
# and its exact inverse, for a mask made on the displayed picture (the rotations swap; the rest
# are their own inverse)
DISPLAYED_TO_STORED = {**STORED_TO_DISPLAYED, 6: _T.ROTATE_90, 8: _T.ROTATE_270}


def image_error_message(path: str, e: BaseException) -> str:
    """An image Pillow cannot read, in one line naming the file and the fix (training, the mask
    cache and the tools read images; this policy reads their headers)."""
    if isinstance(e, Image.DecompressionBombError):
        return (f"image {path} is larger than Pillow allows ({e}): shrink the file, or raise the limit with "
                f"{LIMIT_VARIABLE}=<pixels> in the environment (0: no limit)")
    return f"cannot read image {path}: {e}. Replace or delete the file."


def exif_orientation(image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable) of an open image, or of a file (a
    path or a file object), reading its header only."""
    try:
        if isinstance(image, Image.Image):
            value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        else:
            with Image.open(image) as im:
                value = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except (*IMAGE_ERRORS, TypeError):
        return 1  # an unreadable image is reported by whoever reads its pixels
    return value if value in STORED_TO_DISPLAYED else 1  # 0, 9, ...: no orientation, as viewers show them


MAX_MASK_PIXELS_PER_IMAGE_PIXEL = 64  # SAM run on a copy upscaled up to 8x per side still fits
MAX_MASK_PIXELS_ANY_IMAGE = 4096 * 4096


def check_mask_not_huge(mask_hw: tuple[int, int], image_wh: tuple[int, int]) -> None:
    """ValueError for a mask far larger than its image (no resized copy is that large)."""
    (mh, mw), (w, h) = mask_hw, image_wh
    if mh * mw > max(MAX_MASK_PIXELS_PER_IMAGE_PIXEL * h * w, MAX_MASK_PIXELS_ANY_IMAGE):
        raise ValueError(f"the mask claims {mw}x{mh} pixels but its image is {w}x{h}: not a mask of this picture "
                         f"(nothing was decoded)")


def _same_aspect(mh: int, mw: int, h: int, w: int) -> bool:
    # up to the rounding of a resized copy: one pixel at the larger of the two resolutions
    return abs(mw * h - w * mh) <= max(h, mh, w, mw)


def _fits(mask_hw: tuple[int, int], hw: tuple[int, int]) -> bool:
    return tuple(mask_hw) == tuple(hw) or _same_aspect(*mask_hw, *hw)


def mask_fit(mask_hw: tuple[int, int], image_wh: tuple[int, int], orientation: int = 1, frame: str = UNKNOWN) -> str:
    """'same', 'resize' or 'orient' (made on the displayed picture: mapped into the stored frame,
    then resized if needed) for a mask of size (H, W) on an image of size (W, H) with this EXIF
    orientation, made in ``frame`` (sam/files.py: stored, displayed, unknown); ValueError (naming
    both sizes) when the mask belongs to no such image."""
    (mh, mw), (w, h) = mask_hw, image_wh
    if (mh, mw) == (h, w) and (orientation not in STORED_TO_DISPLAYED or frame != DISPLAYED):
        return "same"
    check_mask_not_huge(mask_hw, image_wh)
    stored = _fits((mh, mw), (h, w))
    displayed = orientation in STORED_TO_DISPLAYED and _fits((mh, mw), (w, h) if orientation >= 5 else (h, w))
    if displayed and (frame == DISPLAYED or not stored):  # the size decides where only one frame fits
        return "orient"
    if stored:
        return "same" if (mh, mw) == (h, w) else "resize"
    hint = (" (the image has EXIF orientation %d, which keeps its size)" % orientation if orientation in (2, 3, 4)
            else "")
    raise ValueError(f"the mask is {mw}x{mh} but its image is {w}x{h}{hint}: not the same picture, nor a "
                     f"resized or EXIF-oriented copy of it")


def frame_undetermined(mask_hw: tuple[int, int], image_wh: tuple[int, int], orientation: int, frame: str) -> bool:
    """True where neither the layout nor the size tells whether the mask was made on the stored
    pixels or on the displayed picture (orientation 2-4, or 5-8 on a square image, in a layout that
    records no frame): it is then taken as the stored pixels."""
    if frame != UNKNOWN or orientation not in STORED_TO_DISPLAYED:
        return False
    (mh, mw), (w, h) = mask_hw, image_wh
    return _fits((mh, mw), (h, w)) and _fits((mh, mw), (w, h) if orientation >= 5 else (h, w))


def to_stored_frame(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A mask made on the displayed picture, in the stored pixels' frame (the exact inverse of the
    orientation; the resolution is kept)."""
    if orientation not in DISPLAYED_TO_STORED:
        return mask
    return np.asarray(Image.fromarray(mask).transpose(DISPLAYED_TO_STORED[orientation]))


def fit_mask(mask: np.ndarray, image_wh: tuple[int, int], orientation: int, path: str,
             frame: str = UNKNOWN) -> tuple[np.ndarray, str]:
    """The mask on the image's pixel grid under the policy above, and which rule applied."""
    try:
        rule = mask_fit(mask.shape, image_wh, orientation, frame)
    except ValueError as e:
        raise MaskFileError(f"{path}: {e}. Regenerate its masks from the image as Pillow reads it") from None
    if rule == "same":
        return mask, rule
    if rule == "orient":
        mask = to_stored_frame(mask, orientation)
    if mask.shape != (image_wh[1], image_wh[0]):
        mask = np.asarray(Image.fromarray(mask).resize(tuple(image_wh), Image.NEAREST))
    return mask, rule
