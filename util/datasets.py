"""Pretraining datasets over one or several --data_path roots of any kind (util/image_roots.py
opens them: train/ splits, class folders, LMDB databases; tar shards: util/shards.py): reading one
sample (image and segment mask), its seeded augmentation, the loader's worker settings and the
batch collation (finetuning and linear probing read util/finetune_data.py).
"""
from __future__ import annotations

import io
import multiprocessing
import os
from typing import Callable, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from util.errors import UserError
from util.image_roots import DEFAULT_MASK_SIZE_CHECK, LMDB, ImageRoot, root_kind
from util.images import DEFAULT_DATA_TIMEOUT_S, DataError, EncodedImage, load_rgb, read_deadline
from util.lmdb_images import LmdbImages
from util.mask_geometry import exif_orientation, fit_mask
from util.transforms import DeferredPretrainTransform, PendingBatch, PendingImage


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random generator of one sample in one epoch: augmentations drawn from it do not depend
    on how samples are spread over workers and ranks, nor on where a run was resumed."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 63)


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


def loader_options(num_workers: int, prefetch_factor: int = 4) -> dict:
    """DataLoader worker settings: workers forked once for the whole run (persistent), each
    keeping prefetch_factor batches ready. The loader draws its workers' base seed from its own
    generator, not the global one: with workers started once, a draw from the global generator in
    the first epoch only would make a resumed run's random masks differ from an uninterrupted
    run's (augmentations are seeded per sample, so the workers' seeds decide nothing)."""
    options = {"num_workers": num_workers, "generator": torch.Generator().manual_seed(0)}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=prefetch_factor)
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
    opened and checked at construction (util/image_roots.py).

    The segment is the annotation whose coverage is closest to ``coverage_ratio`` percent, as an
    (H, W) uint8 array on the image's pixel grid, 1 = hidden. With ``decode=False`` the image is an
    EncodedImage (the file's bytes) instead of a PIL image.
    """

    def __getitem__(self, index: int):
        rel, target = self.samples.rel(index), int(self.samples.labels[index])
        path = os.path.join(self.image_root, rel)
        with read_deadline(path, self.read_timeout):
            img = load_rgb(path) if self.decode else EncodedImage(path)
        if not self.with_masks:
            return img, None, target
        if self.cache_rows is not None and self.cache_rows[index] >= 0:
            with read_deadline(self.cache.bin_path, self.read_timeout):
                mask = self.cache.load_row(int(self.cache_rows[index]), img.size, rel)
        else:
            with read_deadline(self.source.location(rel), self.read_timeout):
                mask = self.source.load(rel, self.coverage_ratio, img.size)
        if mask.shape != (img.height, img.width):  # the size policy of util/mask_geometry.py
            orientation = exif_orientation(path if self.decode else io.BytesIO(img.data))
            mask, rule = fit_mask(mask, img.size, orientation, self.source.location(rel))
            if rule == "rotate":
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
        self.samples = ConcatDataset(self.folders)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.with_masks = self.folders[0].with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            img, mask, target = self.samples[index]
        except UserError as e:
            if not self.skip_bad_samples:
                raise
            return BadSample(str(e))
        generator = sample_generator(self.seed, self.epoch, index)
        if mask is None:
            return self.transform(img, generator=generator), target
        img_t, mask_t = self.transform(img, mask, generator=generator)
        return img_t, mask_t, target

    def rotated_masks(self) -> int:
        """How many masks so far were rotated into their EXIF-rotated image's frame (this process
        and its loader workers)."""
        return sum(f.rotated_masks.value for f in self.folders)

    def mask_notes(self) -> dict[str, int]:
        """What the mask readers had to repair so far (this process and its loader workers):
        masks rotated into an EXIF-rotated image's frame, PNGs not strictly 0/255 that were
        thresholded at 128, segmae tables not sorted by coverage that were sorted."""
        sources = [f.source for f in self.folders if f.source is not None]
        return {"rotated": self.rotated_masks(), "thresholded": sum(s.thresholded.value for s in sources),
                "unsorted": sum(s.unsorted.value for s in sources)}

    def __repr__(self) -> str:
        roots = ", ".join(f.root for f in self.folders)
        return f"PretrainDataset({len(self)} images from {roots}, masks={self.with_masks}, transform={self.transform})"


def build_pretrain_dataset(data_paths: Sequence[str] | str, transform: Callable, with_masks: bool,
                           coverage_ratio: float = 50.0, allow_missing_masks: bool = False,
                           seed: int = 0, skip_bad_samples: bool = False,
                           read_timeout: float = DEFAULT_DATA_TIMEOUT_S, mask_format: str = "auto",
                           mask_size_check: int | None = DEFAULT_MASK_SIZE_CHECK) -> PretrainDataset:
    """One dataset over one or several roots of any kind (printing which kind each was taken as).
    A DeferredPretrainTransform gets the encoded files."""
    if isinstance(data_paths, str):
        data_paths = [data_paths]
    decode = not isinstance(transform, DeferredPretrainTransform)
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
                mask_size_check=mask_size_check))
        print(f"--data_path {root}: {folders[-1].describe()}")
    return PretrainDataset(folders, transform, seed, skip_bad_samples)
