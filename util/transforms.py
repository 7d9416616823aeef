"""Joint geometric augmentation of an image and its SAM segment.

The image and the mask see the same RandomResizedCrop and flip (bicubic for the image, nearest for
the mask). Random numbers are drawn exactly as torchvision's RandomResizedCrop followed by
RandomHorizontalFlip draw them, so with ``mask=None`` and the global generator this is the MAE
reference's pretraining transform, sample for sample. A per-sample ``generator`` makes the
augmentation independent of worker and rank layout (see util/datasets.PretrainDataset).

Two data paths share the crop and flip draws (``PretrainTransform.draw``):
- ``PretrainTransform``: decode, crop, resize and flip in the CPU workers (``--data_backend cpu``);
- ``DeferredPretrainTransform``: the workers only read the file and crop the mask; the batch is
  decoded (nvjpeg on a GPU), cropped, resized and flipped on the training device when it is moved
  there (``PendingBatch.to``, ``--data_backend gpu``). Same boxes, same flips, same masks; image
  pixels differ only by the resize implementation (torch's antialiased bicubic vs Pillow's).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from util.errors import UserError
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


# Input normalisation (mean, std): ImageNet's (MAE's, the default), or "vit": 0.5 / 0.5, what
# Union14M's text-line MAE and Segmenter's own ViT backbones use
NORMALIZATIONS = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                  "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# crop_flip: the reference's RandomResizedCrop + flip; resize: the whole image resized to the input
# size, nothing random (text lines: a crop cuts letters off, a flipped word is another word)
AUGMENTS = ("crop_flip", "resize")
REFERENCE_RECIPE = {"augment": "crop_flip", "normalization": "imagenet"}  # the MAE reference's (and older runs')
TEXT_LINE_RECIPE = {"augment": "resize", "normalization": "vit"}  # Union14M's, the default of its models


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
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, resize_only: bool = False):
        self.size = as_hw(input_size)
        self.resize_only = resize_only
        aspect = self.size[1] / self.size[0]
        self.scale = scale
        self.ratio = (ratio[0] * aspect, ratio[1] * aspect)
        self.hflip = hflip
        self.normalize = T.Normalize(mean, std)

    def draw(self, height: int, width: int, generator: torch.Generator | None = None):
        """The random crop box (top, left, h, w) and flip of one sample, in the reference's order
        (resize_only: the whole image, no flip, nothing drawn)."""
        if self.resize_only:
            return (0, 0, height, width), False
        box = random_resized_crop_params(height, width, self.scale, self.ratio, generator)
        flip = torch.rand(1, generator=generator).item() < self.hflip
        return box, flip

    def __call__(self, img: Image.Image, mask: np.ndarray | None = None,
                 generator: torch.Generator | None = None):
        box, flip = self.draw(img.height, img.width, generator)
        img = TF.resized_crop(img, *box, list(self.size), T.InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        img = self.normalize(TF.to_tensor(img))
        if mask is None:
            return img
        return img, crop_mask(mask, box, flip, self.size)

    def __repr__(self) -> str:
        norm = "" if tuple(self.normalize.mean) == tuple(IMAGENET_DEFAULT_MEAN) else f", mean={tuple(self.normalize.mean)}"
        if self.resize_only:
            return f"{type(self).__name__}(size={self.size}, resize only: no crop, no flip{norm})"
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"ratio=({self.ratio[0]:.3f}, {self.ratio[1]:.3f}), hflip={self.hflip}{norm})")


def crop_mask(mask: np.ndarray, box: tuple[int, int, int, int], flip: bool, size: tuple[int, int]) -> torch.Tensor:
    """The segment mask under a crop box and flip, nearest-neighbour resized: (1, H, W) float."""
    mask_img = TF.resized_crop(Image.fromarray(mask.astype(np.uint8)), *box, list(size), T.InterpolationMode.NEAREST)
    if flip:
        mask_img = TF.hflip(mask_img)
    return torch.from_numpy(np.asarray(mask_img, dtype=np.float32).copy()).unsqueeze(0)


class PendingImage:
    """One sample's image on its way to the training device: the encoded JPEG file (or, for other
    formats, the pixels decoded in the worker, uint8 (3, h, w)), its crop box and flip, and the
    output size and normalisation of the transform that drew them."""

    def __init__(self, data: torch.Tensor, encoded: bool, box: tuple[int, int, int, int], flip: bool,
                 size: tuple[int, int], mean, std, path: str = ""):
        self.data, self.encoded, self.box, self.flip = data, encoded, box, flip
        self.size, self.mean, self.std, self.path = size, tuple(mean), tuple(std), path


class PendingBatch:
    """A batch of PendingImage. ``.to(device)`` decodes it there (nvjpeg on a GPU, in one batched
    call), crops, resizes (bicubic, antialiased), flips and normalises each image, and returns the
    (N, 3, H, W) float tensor the model takes, so a training loop's ``samples.to(device)`` works
    unchanged for either data path."""

    def __init__(self, items: list[PendingImage]):
        self.items, self.size = items, items[0].size
        self.mean = torch.tensor(items[0].mean).view(1, 3, 1, 1)
        self.std = torch.tensor(items[0].std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "PendingBatch":
        for item in self.items:
            item.data = item.data.pin_memory()
        return self

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        jpegs = [i for i, item in enumerate(self.items) if item.encoded]
        pixels: dict[int, torch.Tensor] = {}
        if jpegs:
            pixels.update(zip(jpegs, self._decode([self.items[i] for i in jpegs], device)))
        out = torch.empty(len(self.items), 3, *self.size, device=device)
        for i, item in enumerate(self.items):
            img = pixels[i] if i in pixels else item.data.to(device, non_blocking=non_blocking)
            top, left, h, w = item.box
            crop = img[None, :, top:top + h, left:left + w].float()
            crop = F.interpolate(crop, size=self.size, mode="bicubic", antialias=True, align_corners=False)
            if item.flip:
                crop = crop.flip(-1)
            out[i] = crop[0]
        # uint8 rounding and range as Pillow's resize, then ToTensor + Normalize
        out = out.clamp_(0, 255).round_().div_(255)
        return (out - self.mean.to(device)) / self.std.to(device)

    @staticmethod
    def _decode(items: list[PendingImage], device: torch.device) -> list[torch.Tensor]:
        """One batched decode; if the GPU decoder refuses the batch (a JPEG variant it does not
        read), each file is decoded on the CPU instead, and a broken one is named."""
        try:  # torchvision 0.29 deprecates its decoders (for TorchCodec, which needs FFmpeg)
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise UserError("--data_backend gpu needs torchvision.io.decode_jpeg, which this torchvision no "
                            "longer has: use --data_backend cpu") from None
        try:
            return decode_jpeg([item.data for item in items], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # one by one on the CPU, below
        out = []
        for item in items:
            try:
                out.append(decode_jpeg(item.data, mode=ImageReadMode.RGB).to(device))
            except RuntimeError as e:
                raise UserError(f"cannot decode image {item.path}: {e}. Replace or delete the file "
                                f"(python tools/check_dataset.py finds every such file).") from None
        return out


class DeferredPretrainTransform(PretrainTransform):
    """The worker side of ``--data_backend gpu``: draws the crop and flip exactly as
    PretrainTransform (same generator, same order), crops the mask on the CPU (cheap), and leaves
    the image encoded for PendingBatch.to to decode and crop on the training device.

    Takes a util.images.EncodedImage instead of a PIL image."""

    def __call__(self, img, mask: np.ndarray | None = None, generator: torch.Generator | None = None):
        box, flip = self.draw(img.height, img.width, generator)
        if img.is_jpeg:
            data, encoded = torch.frombuffer(bytearray(img.data), dtype=torch.uint8), True
        else:  # PNG and others: nvjpeg only reads JPEG, so the worker decodes these
            data, encoded = torch.from_numpy(np.asarray(img.decode(), dtype=np.uint8).copy()).permute(2, 0, 1), False
        pending = PendingImage(data, encoded, box, flip, self.size, self.normalize.mean, self.normalize.std,
                               img.path)
        if mask is None:
            return pending
        return pending, crop_mask(mask, box, flip, self.size)


DATA_BACKENDS = ("cpu", "gpu")


def build_pretrain_transform(input_size, data_backend: str = "cpu", augment: str = "crop_flip",
                             normalization: str = "imagenet") -> PretrainTransform:
    """The pretraining augmentation of a data path: ``cpu`` (PretrainTransform) or ``gpu``
    (DeferredPretrainTransform, decoded and cropped on the training device); ``augment`` and
    ``normalization`` as AUGMENTS and NORMALIZATIONS say."""
    if data_backend not in DATA_BACKENDS:
        raise ValueError(f"unknown data backend {data_backend!r}; choose one of {', '.join(DATA_BACKENDS)}")
    mean, std = NORMALIZATIONS[normalization]
    return (DeferredPretrainTransform if data_backend == "gpu" else PretrainTransform)(
        input_size, mean=mean, std=std, resize_only=augment == "resize")
