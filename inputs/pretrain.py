"""Pretraining data (as in the MAE reference, the dataset and its transform in one module): the
dataset over one or several --data_path roots of any kind (inputs/roots.py opens them; tar
shards: inputs/shards.py), one sample (image and segment mask) with its seeded joint augmentation,
the loader's worker settings and the batch collation. Finetuning reads inputs/classification.py.

``PretrainTransform`` crops and flips the image and its mask alike in the loader workers
(``--data_backend cpu``); ``DeferredPretrainTransform`` draws the same crop and flip but leaves the
image encoded for the training device (inputs/gpu_decode.py, ``--data_backend gpu``)."""
from __future__ import annotations

import gc
import io
import math
import multiprocessing
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, default_collate

from inputs.gpu_decode import PendingBatch, PendingImage
from inputs.images import DataError, EncodedImage, image_orientation, load_rgb, read_deadline
from inputs.lmdb import LmdbImages
from inputs.roots import DEFAULT_MASK_SIZE_CHECK, LMDB, ImageRoot, root_kind
from inputs.transforms import DATA_BACKENDS, NORMALIZATIONS, as_hw
from run.flags import DEFAULT_DATA_TIMEOUT_S
from sam.files import DISPLAYED, STORED
from sam.geometry import exif_orientation, fit_mask
from util.misc import UserError


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random generator of one sample in one epoch: augmentations drawn from it do not depend
    on how samples are spread over workers and ranks, nor on where a run was resumed."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 63)


# ------------------------------------------------------------------------------------------------
# the joint augmentation of an image and its segment

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
    decodes_in_workers = True  # takes PIL images (False: the file's bytes, inputs.images.EncodedImage)

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


class DeferredPretrainTransform(PretrainTransform):
    """The worker side of ``--data_backend gpu``: draws the crop and flip exactly as
    PretrainTransform (same generator, same order), crops the mask on the CPU (cheap), and leaves
    the image (a inputs.images.EncodedImage) encoded for the training device (inputs/gpu_decode.py)."""
    decodes_in_workers = False

    def __call__(self, img: EncodedImage, mask: np.ndarray | None = None, generator: torch.Generator | None = None):
        box, flip = self.draw(img.height, img.width, generator)
        pending = PendingImage.of(img, box, flip, self.size, self.normalize.mean, self.normalize.std)
        return pending if mask is None else (pending, crop_mask(mask, box, flip, self.size))


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


# ------------------------------------------------------------------------------------------------
# datasets, loader settings, collation

class EpochAware:
    """A dataset whose epoch (which seeds every sample's augmentation) lives in shared memory, so
    that persistent loader workers, forked once, see each new epoch set in the main process."""

    _shared_epoch = None

    @property
    def epoch(self) -> int:
        return self._shared_epoch.value if self._shared_epoch is not None else 0

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._shared_epoch is None:
            self._shared_epoch = multiprocessing.Value("q", 0, lock=False)
        self._shared_epoch.value = int(value)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def freeze_heap(workers: int = 1) -> None:
    """Before forking ``workers`` processes (loader workers, process pools; nothing for 0): one
    garbage collection, then every object left is moved out of the collector's reach (gc.freeze).
    A forked worker shares its parent's memory until it writes to it, and the collector writes to
    every object it examines: without this, a worker's first full collection copies the parent's
    whole heap (about 100 MiB with torch loaded, per worker: 8 GiB on a node of 8 ranks x 10
    workers). Frozen objects are never collected again, which costs nothing for what a run keeps
    to its end."""
    if workers > 0:
        gc.collect()
        gc.freeze()


def loader_options(num_workers: int, prefetch_factor: int = 4) -> dict:
    """DataLoader worker settings: workers forked once for the whole run (persistent), each
    keeping prefetch_factor batches ready, from a frozen heap (freeze_heap). The loader draws its
    workers' base seed from its own generator, not the global one: with workers started once, a
    draw from the global generator in the first epoch only would make a resumed run's random masks
    differ from an uninterrupted run's (augmentations are seeded per sample, so the workers' seeds
    decide nothing)."""
    options = {"num_workers": num_workers, "generator": torch.Generator().manual_seed(0)}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        freeze_heap(num_workers)
    return options


class BadSample:
    """Stands in for a sample that could not be read (with --skip_bad_samples)."""

    def __init__(self, message: str):
        self.message = message


def collate_pretrain(batch: list):
    """(images, segment masks or None, messages of skipped samples); (None, None, messages) when
    every sample of the batch was unreadable."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [b.message for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    if isinstance(good[0][0], PendingImage):  # --data_backend gpu: decoded when moved to the device
        columns = [PendingBatch([g[0] for g in good])] + default_collate([g[1:] for g in good])
    else:
        columns = default_collate(good)
    return columns[0], (columns[1] if len(columns) == 3 else None), bad


class SegmentMaskImageFolder(ImageRoot, Dataset):
    """One root's train/ split, un-augmented: yields (PIL image, segment mask or None, class);
    opened and checked at construction (inputs/roots.py).

    The mask is what ``segment_choice`` (the mask method) hides of the image's SAM segments, by
    default the one whose coverage is closest to ``coverage_ratio`` percent, as an (H, W) uint8
    array on the image's pixel grid, 1 = hidden. With ``decode=False`` the image is an
    EncodedImage (the file's bytes) instead of a PIL image.
    """

    def __getitem__(self, index: int):
        return self.read(index)

    def read(self, index: int, generator: torch.Generator | None = None):
        """Sample ``index``; ``generator``: its random numbers of this epoch, for a method's choice."""
        rel, target = self.samples.rel(index), int(self.samples.labels[index])
        path = os.path.join(self.image_root, rel)
        with read_deadline(path, self.read_timeout):
            img = load_rgb(path) if self.decode else EncodedImage(path)
        # counted where the image is open anyway (a decoded image keeps its EXIF; bytes: read with the header)
        if image_orientation(img) != 1:
            with self.oriented_images.get_lock():
                self.oriented_images.value += 1
        if not self.with_masks:
            return img, None, target
        if self.cache_rows is not None and self.cache_rows[index] >= 0:
            with read_deadline(self.cache.bin_path, self.read_timeout):
                mask = self.cache.load_row(int(self.cache_rows[index]), img.size, rel)
            frame = STORED  # the cache holds every mask in the stored pixels' frame
        else:
            with read_deadline(self.source.location(rel), self.read_timeout):
                segments = self.source.segments(rel)
                mask = self.segment_choice.hidden_segment(segments, img.size, generator)
            frame = segments.frame
        if mask.shape != (img.height, img.width) or frame == DISPLAYED:  # the size policy of sam/geometry.py
            orientation = exif_orientation(path if self.decode else io.BytesIO(img.data))
            mask, rule = fit_mask(mask, img.size, orientation, self.source.location(rel), frame)
            if rule == "orient":
                with self.rotated_masks.get_lock():
                    self.rotated_masks.value += 1
        return img, mask, target


class PretrainDataset(EpochAware, Dataset):
    """Augmented samples from one or several roots: (image, mask, class) with masks, else
    (image, class).

    Each sample's augmentation draws from its own generator seeded by (seed, epoch, index), so the
    batches of an epoch are the same for any number of workers or ranks and after a resume.
    Call ``set_epoch`` before iterating an epoch (persistent workers see it: EpochAware).
    """

    def __init__(self, folders: Sequence[SegmentMaskImageFolder], transform: Callable, seed: int = 0,
                 skip_bad_samples: bool = False):
        self.folders = list(folders)
        self.skip_bad_samples = skip_bad_samples
        self.ends = np.cumsum([len(f) for f in self.folders])  # where each folder's samples end
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.with_masks = self.folders[0].with_masks

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int):
        generator = sample_generator(self.seed, self.epoch, index)
        folder = int(np.searchsorted(self.ends, index, side="right"))
        try:
            img, mask, target = self.folders[folder].read(index - int(self.ends[folder - 1] if folder else 0),
                                                          generator)
        except UserError as e:
            if not self.skip_bad_samples:
                raise
            return BadSample(str(e))
        if mask is None:
            return self.transform(img, generator=generator), target
        img_t, mask_t = self.transform(img, mask, generator=generator)
        return img_t, mask_t, target

    def mask_notes(self) -> dict[str, int]:
        """What the readers met and the mask readers had to repair so far (this process and its
        loader workers): images with an EXIF orientation other than 1 (trained as stored), masks made on the displayed (EXIF-oriented) picture mapped into the stored pixels' frame,
        PNGs not strictly 0/255 that were thresholded at 128, segmae tables not sorted by coverage
        that were sorted."""
        sources = [f.source for f in self.folders if f.source is not None]
        return {"oriented": sum(f.oriented_images.value for f in self.folders),
                "rotated": sum(f.rotated_masks.value for f in self.folders),
                "thresholded": sum(s.thresholded.value for s in sources),
                "unsorted": sum(s.unsorted.value for s in sources)}

    def __repr__(self) -> str:
        roots = ", ".join(f.root for f in self.folders)
        return f"PretrainDataset({len(self)} images from {roots}, masks={self.with_masks}, transform={self.transform})"


def build_pretrain_dataset(data_paths: Sequence[str] | str, transform: Callable, with_masks: bool,
                           coverage_ratio: float = 50.0, allow_missing_masks: bool = False,
                           seed: int = 0, skip_bad_samples: bool = False,
                           read_timeout: float = DEFAULT_DATA_TIMEOUT_S, mask_format: str = "auto",
                           mask_size_check: int | None = DEFAULT_MASK_SIZE_CHECK,
                           segment_choice=None) -> PretrainDataset:
    """One dataset over one or several roots of any kind (printing which kind each was taken as).
    A transform with ``decodes_in_workers`` False (DeferredPretrainTransform) gets the encoded files.
    ``segment_choice``: the mask method, which chooses what each image hides (default: the segment
    closest to ``coverage_ratio``)."""
    if isinstance(data_paths, str):
        data_paths = [data_paths]
    decode = getattr(transform, "decodes_in_workers", True)  # any other transform takes PIL images
    folders = []
    for root in data_paths:
        if root_kind(root) == LMDB:
            if with_masks:
                raise DataError(f"--data_path {root} is an LMDB database, which holds images only: segment mask "
                                f"methods need a SAM mask file per image (masks/<class>/<image stem>.json beside "
                                f"image files in class folders). Pretrain it with --mask_method patches, or write "
                                f"its images out as class folders and generate masks for them")
            folders.append(LmdbImages(root, decode, read_timeout))
        else:
            folders.append(SegmentMaskImageFolder(
                root, with_masks, coverage_ratio, allow_missing_masks=allow_missing_masks, decode=decode,
                skip_bad_samples=skip_bad_samples, read_timeout=read_timeout, mask_format=mask_format,
                mask_size_check=mask_size_check, segment_choice=segment_choice))
        print(f"--data_path {root}: {folders[-1].describe()}")
    return PretrainDataset(folders, transform, seed, skip_bad_samples)
