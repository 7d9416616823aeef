"""Which masks fit which images. One policy for training, the mask cache, check_dataset.py and
generate_masks.py. The image is always read as the reference MAE reads it (Pillow, EXIF
orientation NOT applied); a mask (H_m, W_m) for an image of W x H pixels is
  - used as is when it has the image's size;
  - resized (nearest) when it has the image's aspect ratio at another resolution (SAM run on a
    downscaled copy);
  - rotated into the file's pixel frame, then resized if needed, when its size is the transposed
    one and the image carries EXIF orientation 5-8 (SAM's scripts/amg.py reads images with cv2,
    which applies the orientation, so its masks are in the displayed frame);
  - refused (MaskFileError naming the file and both sizes) in every other case, and whenever the
    mask has more than MAX_MASK_PIXELS_PER_IMAGE_PIXEL times the image's pixels (and more than
    4096 x 4096): such a size is checked before anything is decoded, since decoding a crafted
    100000 x 100000 RLE would take 10 GB.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from sam.files import MaskFileError

# what Pillow raises for a file it cannot read, including one over its decompression-bomb limit
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LIMIT_VARIABLE = "PIL_MAX_IMAGE_PIXELS"
if os.environ.get(LIMIT_VARIABLE):  # the user's own choice of Pillow's limit (0: none)
    Image.MAX_IMAGE_PIXELS = int(os.environ[LIMIT_VARIABLE]) or None
EXIF_ORIENTATION_TAG = 0x0112
# display frame -> file frame: the inverse of the transpose that EXIF orientation 5-8 asks for
_DISPLAY_TO_FILE = {5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                    7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


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
            return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        with Image.open(image) as im:
            return int(im.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except (*IMAGE_ERRORS, TypeError):
        return 1  # an unreadable image is reported by whoever reads its pixels


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


def mask_fit(mask_hw: tuple[int, int], image_wh: tuple[int, int], orientation: int = 1) -> str:
    """'same', 'resize' or 'rotate' for a mask of size (H, W) on an image of size (W, H); ValueError
    (naming both sizes) when the mask belongs to no such image."""
    (mh, mw), (w, h) = mask_hw, image_wh
    if (mh, mw) == (h, w):
        return "same"
    check_mask_not_huge(mask_hw, image_wh)
    if _same_aspect(mh, mw, h, w):
        return "resize"
    if orientation in _DISPLAY_TO_FILE and _same_aspect(mw, mh, h, w):
        return "rotate"
    hint = (" (the image has EXIF orientation %d, which keeps its size)" % orientation if orientation != 1
            else "")
    raise ValueError(f"the mask is {mw}x{mh} but its image is {w}x{h}{hint}: not the same picture, nor a "
                     f"resized or EXIF-rotated copy of it")


def fit_mask(mask: np.ndarray, image_wh: tuple[int, int], orientation: int, path: str) -> tuple[np.ndarray, str]:
    """The mask on the image's pixel grid under the policy above, and which rule applied."""
    try:
        rule = mask_fit(mask.shape, image_wh, orientation)
    except ValueError as e:
        raise MaskFileError(f"{path}: {e}. Regenerate its masks from the image as Pillow reads it") from None
    if rule == "same":
        return mask, rule
    img = Image.fromarray(mask)
    if rule == "rotate":
        img = img.transpose(_DISPLAY_TO_FILE[orientation])
    if img.size != tuple(image_wh):
        img = img.resize(tuple(image_wh), Image.NEAREST)
    return np.asarray(img), rule
