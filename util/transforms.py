"""Joint geometric augmentation of an image and its SAM segment.

The image and the mask see the same RandomResizedCrop and flip (bicubic for the image, nearest for
the mask). Random numbers are drawn exactly as torchvision's RandomResizedCrop followed by
RandomHorizontalFlip draw them, so with ``mask=None`` and the global generator this is the MAE
reference's pretraining transform, sample for sample. A per-sample ``generator`` makes the
augmentation independent of worker and rank layout (see util/datasets.PretrainDataset).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def as_hw(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """224 -> (224, 224); [32, 128] -> (32, 128)."""
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"input size must be one or two integers (H W), got {size}")
    return size


def random_resized_crop_params(height: int, width: int, scale, ratio,
                               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect ratio (w/h) in
    ``ratio`` (log-uniform); after 10 failed tries a central crop clamped to the ratio range."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision computes it
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """RandomResizedCrop + horizontal flip on (image, mask), ToTensor + Normalize on the image.

    For a non-square ``input_size`` the crop's aspect-ratio range is centred on the target's, so
    that wide inputs (e.g. text lines) are not squeezed.
    """

    def __init__(self, input_size, scale=(0.2, 1.0), ratio=(3. / 4., 4. / 3.), hflip: float = 0.5,
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.size = as_hw(input_size)
        aspect = self.size[1] / self.size[0]
        self.scale = scale
        self.ratio = (ratio[0] * aspect, ratio[1] * aspect)
        self.hflip = hflip
        self.normalize = T.Normalize(mean, std)

    def __call__(self, img: Image.Image, mask: np.ndarray | None = None,
                 generator: torch.Generator | None = None):
        top, left, height, width = random_resized_crop_params(img.height, img.width, self.scale, self.ratio, generator)
        img = TF.resized_crop(img, top, left, height, width, list(self.size), T.InterpolationMode.BICUBIC)
        flip = torch.rand(1, generator=generator).item() < self.hflip
        if flip:
            img = TF.hflip(img)
        img = self.normalize(TF.to_tensor(img))
        if mask is None:
            return img
        mask_img = Image.fromarray(mask.astype(np.uint8))
        mask_img = TF.resized_crop(mask_img, top, left, height, width, list(self.size), T.InterpolationMode.NEAREST)
        if flip:
            mask_img = TF.hflip(mask_img)
        return img, torch.from_numpy(np.asarray(mask_img, dtype=np.float32).copy()).unsqueeze(0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"ratio=({self.ratio[0]:.3f}, {self.ratio[1]:.3f}), hflip={self.hflip})")
