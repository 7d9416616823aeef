"""ADE20k (ADEChallengeData2016 layout) with Segmenter's augmentation, on torchvision v2 tensors.

    <root>/images/{training,validation}/*.jpg
    <root>/annotations/{training,validation}/*.png     0 = "other" (ignored), 1..150 = classes

Labels are reduced to 0..149 with 255 ignored. Training: random resize to 0.5-2.0 x a 2048x512
base keeping aspect, random crop (at most 75% of the crop in one class), flip, photometric
distortion, normalise, pad with ignore. Validation: resize the short side, no crop (inference is
by sliding windows); the original labels are kept for scoring.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from inputs.images import DataError, load_rgb
from inputs.pretrain import EpochAware, sample_generator
from inputs.transforms import NORMALIZATIONS
from sam.geometry import IMAGE_ERRORS

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
SPLITS = {"train": "training", "val": "validation"}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 ('other') -> 255 (ignored); 1..150 -> 0..149."""
    label = label.astype(np.int64) - 1
    label[label < 0] = IGNORE_INDEX
    return label.astype(np.uint8)


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """Keep-aspect size whose long side fits max(scale) and short side fits min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def random_crop_box(label: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float, generator=None,
                    tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w); retries up to 10 times for a crop where no class takes more than
    cat_max_ratio of the labelled pixels."""
    H, W = label.shape[-2:]
    ch, cw = min(crop[0], H), min(crop[1], W)
    for _ in range(tries):
        top = int(torch.randint(0, H - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - cw + 1, (1,), generator=generator))
        if cat_max_ratio >= 1.0:
            break
        patch = label[..., top:top + ch, left:left + cw]
        counts = torch.bincount(patch[patch != IGNORE_INDEX].flatten().long())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
            break
    return top, left, ch, cw


def photometric_distortion(img: torch.Tensor, generator=None) -> torch.Tensor:
    """Random brightness (+-32), contrast (0.5-1.5), saturation (0.5-1.5) and hue (+-18/180 of the
    circle), each with probability 1/2, contrast first or last: Segmenter's (mmseg's) recipe."""
    def chance() -> bool:
        return bool(torch.rand(1, generator=generator) < 0.5)

    def uniform(a: float, b: float) -> float:
        return float(torch.empty(1).uniform_(a, b, generator=generator))

    x = img.float()
    if chance():
        x = (x + uniform(-32, 32)).clamp(0, 255)
    contrast_first = chance()
    if contrast_first and chance():
        x = (x * uniform(0.5, 1.5)).clamp(0, 255)
    x = x.round().to(torch.uint8)
    if chance():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5))
    if chance():
        x = TF.adjust_hue(x, uniform(-18, 18) / 180.0)
    if not contrast_first and chance():
        x = (x.float() * uniform(0.5, 1.5)).clamp(0, 255).round().to(torch.uint8)
    return x


def training_scale(short_side: int) -> tuple[int, int]:
    """The scale images are resized to before the random ratio and crop, for an evaluation at
    ``short_side``: (4 s, s), i.e. rstrudel/segmenter's (2048, 512) at 512 and (2560, 640) at 640,
    so that training sees objects at the size it is scored at, whatever the crop (the frozen probe
    uses it; the Segmenter keeps its recipe's (2048, 512) for every crop)."""
    return 4 * short_side, short_side


class SegTrainTransform:
    def __init__(self, crop_size: int | tuple[int, int], base_scale=(2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip: float = 0.5, photometric: bool = True,
                 normalization: str = "imagenet"):
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.normalization = normalization
        self.base_scale, self.ratio_range = base_scale, ratio_range
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric

    def __call__(self, img: tv_tensors.Image, label: tv_tensors.Mask, generator=None):
        ratio = float(torch.empty(1).uniform_(*self.ratio_range, generator=generator))
        size = rescale_size(img.shape[-2], img.shape[-1], (self.base_scale[0] * ratio, self.base_scale[1] * ratio))
        img = TF.resize(img, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label, list(size), interpolation=TF.InterpolationMode.NEAREST_EXACT)
        top, left, h, w = random_crop_box(label, self.crop, self.cat_max_ratio, generator)
        img, label = TF.crop(img, top, left, h, w), TF.crop(label, top, left, h, w)
        if torch.rand(1, generator=generator) < self.flip:
            img, label = TF.horizontal_flip(img), TF.horizontal_flip(label)
        if self.photometric:
            img = tv_tensors.Image(photometric_distortion(img, generator))
        img = normalize(img, self.normalization)
        pad_h, pad_w = self.crop[0] - img.shape[-2], self.crop[1] - img.shape[-1]
        if pad_h > 0 or pad_w > 0:
            img = TF.pad(img, [0, 0, pad_w, pad_h], fill=0)
            label = TF.pad(label, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
        return img, label


def normalize(img: torch.Tensor, normalization: str = "imagenet") -> torch.Tensor:
    mean, std = NORMALIZATIONS[normalization]
    return TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(mean), list(std))


class SegEvalTransform:
    """Resize so the short side is ``short_side`` (long side at most 4x it), normalise; the label
    is returned untouched at its original size."""

    def __init__(self, short_side: int = 512, normalization: str = "imagenet"):
        self.scale = (4 * short_side, short_side)
        self.normalization = normalization

    def __call__(self, img: tv_tensors.Image, label: tv_tensors.Mask, generator=None):
        size = rescale_size(img.shape[-2], img.shape[-1], self.scale)
        img = TF.resize(img, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return normalize(img, self.normalization), label


class ADE20K(EpochAware, Dataset):
    """Pairs images/<split>/<name>.jpg with annotations/<split>/<name>.png."""

    def __init__(self, root: str, split: str, transform, seed: int = 0, num_classes: int = ADE20K_CLASSES):
        self.image_dir = os.path.join(root, "images", SPLITS[split])
        self.label_dir = os.path.join(root, "annotations", SPLITS[split])
        for d in (self.image_dir, self.label_dir):
            if not os.path.isdir(d):
                raise DataError(f"--dataset-dir {root} has no {os.path.relpath(d, root)}/: expected the "
                                f"ADEChallengeData2016 layout; download it with python -m segmenter.prepare_ade20k")
        # hidden names (macOS ._x.jpg AppleDouble files) are not images
        self.image_files = {os.path.splitext(f)[0]: f for f in os.listdir(self.image_dir)
                            if f.lower().endswith((".jpg", ".jpeg", ".png")) and not f.startswith(".")}
        names = sorted(self.image_files)
        missing = [n for n in names if not os.path.exists(os.path.join(self.label_dir, n + ".png"))]
        if missing:
            raise DataError(f"{len(missing)} images in {self.image_dir} have no label PNG in {self.label_dir}, "
                            f"e.g. {missing[0]}")
        if not names:
            raise DataError(f"no images in {self.image_dir}")
        self.names = names
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        name = self.names[index]
        img = load_rgb(os.path.join(self.image_dir, self.image_files[name]))
        label_path = os.path.join(self.label_dir, name + ".png")
        try:
            label = np.asarray(Image.open(label_path))
        except IMAGE_ERRORS as e:
            raise DataError(f"cannot read label {label_path}: {e}") from None
        if label.ndim != 2:
            raise DataError(f"label {label_path} has {label.shape[2] if label.ndim == 3 else label.ndim} channels: "
                            f"expected a single-channel PNG of class indices (0 = other, 1..{self.num_classes}), "
                            f"not a colour rendering")
        if label.shape != (img.height, img.width):
            raise DataError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image is "
                            f"{img.width}x{img.height}")
        if label.size and int(label.max()) > self.num_classes:
            raise DataError(f"label {label_path} holds class {int(label.max())}, but there are {self.num_classes} "
                            f"classes (0 = other, 1..{self.num_classes}); fix the file or set --n-cls")
        img_t = tv_tensors.Image(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        label_t = tv_tensors.Mask(torch.from_numpy(reduce_zero_label(label)).unsqueeze(0))
        return img_t, label_t

    def __getitem__(self, index: int):
        img, label = self.load(index)
        generator = sample_generator(self.seed, self.epoch, index)
        img, label = self.transform(img, label, generator)
        return img.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)[0].long()
