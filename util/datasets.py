"""Datasets: ImageNet-style folders with SAM mask files beside them (pretraining), and plain
ImageFolders with the reference's finetuning / linear-probing transforms.

    <root>/train/<class>/<image>          images (torchvision ImageFolder layout)
    <root>/masks/<class>/<image stem>...   SAM masks mirroring train/, in any layout of
                                           util/mask_sources.py (SAM's JSON, segmae, amg.py)

Several roots can be pretrained on together. Problems a user can fix (no train/, no masks/,
missing mask files) are found when the dataset is built, not in the middle of an epoch.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import queue
import random
import signal
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import ConcatDataset, Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from util.errors import UserError
from util.mask_sources import MaskSource, open_mask_source, read_empty_list, stem_of
from util.mask_cache import MaskCache
from util.sam_masks import check_unique_stems, exif_orientation, fit_mask
from util.transforms import DeferredPretrainTransform, PendingBatch, PendingImage, as_hw


class DataError(UserError):
    """A dataset problem the user must fix (wrong path, missing files); the message says how."""


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Opens an image as RGB (from ``data`` when the file was already read); a corrupt or
    truncated file raises an error naming it."""
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
            img = Image.open(f)
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                return _high_bit_depth_to_rgb(img)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}. Replace or delete the file.") from None


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit greyscale (Pillow modes I;16*, I) scaled to 8 bit: convert('RGB') clips every value
    above 255 and turns such images white."""
    values = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
    grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


class EncodedImage:
    """An image file's bytes and size, read without decoding the pixels (``--data_backend gpu``
    decodes them on the training device); unreadable headers raise an error naming the file."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.data = f.read()
            with Image.open(io.BytesIO(self.data)) as img:
                self.width, self.height = img.size
                self.is_jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}. Replace or delete the file.") from None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def decode(self) -> Image.Image:
        """The RGB pixels (for formats the GPU decoder does not read)."""
        return load_rgb(self.path, self.data)


DEFAULT_DATA_TIMEOUT_S = 120


_reading: list[tuple[str, float]] = []  # the file being read under a deadline, in this process


def _deadline_expired(signum, frame):
    path, seconds = _reading[-1]
    raise DataError(f"reading {path} took more than {seconds:g}s (--data_timeout): a FIFO, a hung network "
                    f"file system or a failing disk? Fix or remove the file")


@contextmanager
def read_deadline(path: str, seconds: float):
    """Raises a DataError naming ``path`` if the block (reading it) takes longer than ``seconds``: a
    FIFO, a hung network file system or a dead disk then stops the run with the file named,
    before the other ranks' collectives time out. SIGALRM, so only in a process's main thread
    (data-loader workers and the main loop); elsewhere, or with seconds <= 0, no deadline. The
    handler is installed once per process; each read only arms and disarms the timer."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGALRM) is not _deadline_expired:
        signal.signal(signal.SIGALRM, _deadline_expired)
    _reading.append((path, seconds))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _reading.pop()


class SegmentMaskImageFolder(Dataset):
    """One root's train/ split, un-augmented: yields (PIL image, segment mask or None, class).

    The segment is the annotation whose coverage is closest to ``coverage_ratio`` percent, as an
    (H, W) uint8 array on the image's pixel grid, 1 = hidden. With ``decode=False`` the image is an
    EncodedImage (the file's bytes) instead of a PIL image.
    """

    def __init__(self, root: str, with_masks: bool, coverage_ratio: float = 50.0,
                 split: str = "train", allow_missing_masks: bool = False, decode: bool = True,
                 skip_bad_samples: bool = False, read_timeout: float = DEFAULT_DATA_TIMEOUT_S,
                 mask_format: str = "auto"):
        self.root = root
        self.decode = decode
        self.read_timeout = read_timeout
        self.image_root = os.path.join(root, split)
        self.mask_root = os.path.join(root, "masks")
        self.with_masks = with_masks
        self.coverage_ratio = coverage_ratio

        if not os.path.isdir(root):
            raise DataError(f"--data_path {root} does not exist or is not a folder")
        if not os.path.isdir(self.image_root):
            raise DataError(f"--data_path {root} has no {split}/ folder: expected {split}/<class>/<image> "
                            f"(ImageFolder layout). Make a toy one with: python tools/make_toy_data.py")
        if with_masks and not os.path.isdir(self.mask_root):
            raise DataError(f"--data_path {root} has no masks/ folder, which segment mask methods need "
                            f"(masks/<class>/<image stem>.json, or the segmae / amg.py folders "
                            f"masks/<class>/<image stem>/). Generate SAM masks for it, or pretrain "
                            f"with --mask_method patches.")
        try:
            self.classes, self.class_to_idx = find_classes(self.image_root)
            self.samples = make_dataset(self.image_root, self.class_to_idx, extensions=IMG_EXTENSIONS,
                                        allow_empty=True)
        except FileNotFoundError as e:
            raise DataError(f"no images under {self.image_root}: {e}") from None
        empty = sorted(set(self.classes) - {self.classes[t] for _, t in self.samples})
        if empty and self.samples:
            listed = ", ".join(os.path.join(self.image_root, c) for c in empty[:5])
            if not skip_bad_samples:
                raise DataError(f"{len(empty)} class folder(s) hold no image: {listed}. Remove them, or pass "
                                f"--skip_bad_samples to pretrain without them")
            print(f"WARNING: {len(empty)} class folder(s) hold no image and are skipped: {listed}")
        if not self.samples:
            raise DataError(f"no images found under {self.image_root}")
        # paths relative to train/, once: the mask cache's keys and the mask files' names
        self.rel_paths = [os.path.relpath(p, self.image_root) for p, _ in self.samples]
        self.cache = None
        self.source: MaskSource | None = None
        # masks turned into the image's frame for EXIF-rotated images, counted over the loader's workers
        self.rotated_masks = multiprocessing.Value("q", 0)
        if with_masks:
            self._leave_out_listed_empty()
            check_unique_stems(self.rel_paths, self.image_root)
            self.source = open_mask_source(self.mask_root, {stem_of(r) for r in self.rel_paths}, mask_format)
            if MaskCache.exists(root, coverage_ratio):
                self.cache = MaskCache(root, coverage_ratio, self.source)
                uncached = sum(rel not in self.cache for rel in self.rel_paths)
                print(f"Using the mask cache {self.cache.bin_path}" +
                      (f" ({uncached} images not in it are read from masks/)" if uncached else ""))
            self._check_masks(allow_missing_masks)

    def _leave_out_listed_empty(self) -> None:
        """The original segmae code's emptyfiles.txt names images without masks; like the original,
        those images are not part of the dataset."""
        listed = read_empty_list(self.root)
        if not listed:
            return
        keep = [i for i, rel in enumerate(self.rel_paths) if os.path.basename(rel) not in listed]
        if len(keep) < len(self.samples):
            print(f"{len(self.samples) - len(keep)} images of {self.image_root} are listed in emptyfiles.txt "
                  f"(no masks) and left out, as the original segmae code does")
            self.samples = [self.samples[i] for i in keep]
            self.rel_paths = [self.rel_paths[i] for i in keep]
        if not self.samples:
            raise DataError(f"every image under {self.image_root} is listed in emptyfiles.txt: no image has masks")

    def _check_masks(self, allow_missing: bool) -> None:
        to_check = [i for i, rel in enumerate(self.rel_paths) if self.cache is None or rel not in self.cache]
        present = self.source.present({stem_of(self.rel_paths[i]) for i in to_check}) if to_check else set()
        missing = [i for i in to_check if stem_of(self.rel_paths[i]) not in present]
        if not missing:
            return
        first = "\n  ".join(self.source.location(self.rel_paths[i]) for i in missing[:5])
        msg = (f"{len(missing)} of {len(self.samples)} images under {self.image_root} have no mask file "
               f"({self.source.format} layout), for example:\n  {first}")
        if not allow_missing:
            raise DataError(msg + "\nGenerate the missing masks, or pass --allow_missing_masks to "
                                  "pretrain without those images.")
        print(f"WARNING: {msg}\nThose images are skipped (--allow_missing_masks).")
        missing_set = set(missing)
        keep = [i for i in range(len(self.samples)) if i not in missing_set]
        self.samples = [self.samples[i] for i in keep]
        self.rel_paths = [self.rel_paths[i] for i in keep]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        with read_deadline(path, self.read_timeout):
            img = load_rgb(path) if self.decode else EncodedImage(path)
        if not self.with_masks:
            return img, None, target
        rel = self.rel_paths[index]
        if self.cache is not None and rel in self.cache:
            with read_deadline(self.cache.bin_path, self.read_timeout):
                mask = self.cache.load(rel, img.size)
        else:
            with read_deadline(self.source.location(rel), self.read_timeout):
                mask = self.source.load(rel, self.coverage_ratio, img.size)
        if mask.shape != (img.height, img.width):  # the size policy of util/sam_masks.py
            orientation = exif_orientation(path if self.decode else io.BytesIO(img.data))
            mask, rule = fit_mask(mask, img.size, orientation, self.source.location(rel))
            if rule == "rotate":
                with self.rotated_masks.get_lock():
                    self.rotated_masks.value += 1
        return img, mask, target


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random generator of one sample in one epoch: augmentations drawn from it do not depend
    on how samples are spread over workers and ranks, nor on where a run was resumed."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 63)


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


class DevicePrefetcher:
    """Iterates a pretraining loader with each batch already on the device: a background thread
    moves batch k+1 (for ``--data_backend gpu`` that is decode, crop and resize) on its own CUDA
    stream while the training step runs on batch k. Same batches, same order as the loader.

    Yields what collate_pretrain gives, with the images and masks on ``device``."""

    def __init__(self, loader, device: torch.device, depth: int = 2):
        self.loader, self.device, self.depth = loader, torch.device(device), depth

    def __len__(self) -> int:
        return len(self.loader)

    def _move(self, batch, stream):
        imgs, masks, bad = batch
        if imgs is None:
            return batch, None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            imgs = imgs.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True) if masks is not None else None
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        return (imgs, masks, bad), event

    def __iter__(self):
        done = object()
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        device_index = self.device.index if self.device.index is not None else (torch.cuda.current_device() if cuda else None)

        def put(item) -> bool:
            """Waits for room in the queue unless the consumer has stopped."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                if cuda:
                    torch.cuda.set_device(device_index)
                stream = torch.cuda.Stream(device_index) if cuda else None
                for batch in self.loader:
                    if not put(self._move(batch, stream)):
                        return
                put(done)
            except BaseException as e:  # re-raised in the training loop
                put(e)

        thread = threading.Thread(target=produce, name="device-prefetcher", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:  # the step's stream waits for the copy; the allocator knows
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in batch[:2]:
                        if t is not None:
                            t.record_stream(current)
                yield batch
        finally:
            stop.set()


class PretrainDataset(Dataset):
    """Augmented samples from one or several roots: (image, mask, class) with masks, else
    (image, class).

    Each sample's augmentation draws from its own generator seeded by (seed, epoch, index), so the
    batches of an epoch are the same for any number of workers or ranks and after a resume.
    Call ``set_epoch`` before iterating an epoch (workers are re-created every epoch).
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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
                           read_timeout: float = DEFAULT_DATA_TIMEOUT_S, mask_format: str = "auto") -> PretrainDataset:
    """One dataset over one or several roots. A DeferredPretrainTransform gets the encoded files."""
    if isinstance(data_paths, str):
        data_paths = [data_paths]
    decode = not isinstance(transform, DeferredPretrainTransform)
    folders = [SegmentMaskImageFolder(root, with_masks, coverage_ratio, allow_missing_masks=allow_missing_masks,
                                      decode=decode, skip_bad_samples=skip_bad_samples, read_timeout=read_timeout,
                                      mask_format=mask_format)
               for root in data_paths]
    return PretrainDataset(folders, transform, seed, skip_bad_samples)


def build_eval_transform(input_size, crop_pct: float = 224 / 256):
    """Resize (short side, or both sides for a rectangular size) to size / crop_pct, centre crop."""
    h, w = as_hw(input_size)
    resize = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop((h, w)),
                      T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize, except that keeping 0 bits gives a black image as it did before
    Pillow 13, which raises for it: RandAugment's strongest posterize would crash a run."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
            if name in auto_augment.NAME_TO_OP:
                auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()


def build_finetune_transform(is_train: bool, args):
    """timm's training pipeline (RandAugment, random erasing, ...) as the MAE reference, or the
    evaluation resize + centre crop."""
    if not is_train:
        return build_eval_transform(args.input_size)
    h, w = as_hw(args.input_size)
    return create_transform(input_size=(3, h, w), is_training=True, color_jitter=args.color_jitter,
                            auto_augment=args.aa, interpolation='bicubic', re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_linprobe_transform(is_train: bool, args):
    """The reference's linear-probing augmentation: RandomResizedCrop + flip only."""
    if not is_train:
        return build_eval_transform(args.input_size)
    return T.Compose([T.RandomResizedCrop(as_hw(args.input_size), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


@contextmanager
def seeded_global_rng(generator: torch.Generator):
    """Runs a block with Python's, NumPy's and torch's global generators seeded from ``generator``
    and restores them afterwards: for transforms (timm's) that only draw from the global ones."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class CheckedImageFolder(Dataset):
    """ImageFolder whose unreadable images raise an error naming the file. Augmentations are seeded
    per (seed, epoch, sample), so batches do not depend on the number of workers or ranks."""

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        if not os.path.isdir(root):
            raise DataError(f"{root} does not exist: expected <data_path>/{os.path.basename(root)}/<class>/<image>")
        self.classes, self.class_to_idx = find_classes(root)
        self.samples = make_dataset(root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        self.root, self.transform = root, transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = load_rgb(path)
        with seeded_global_rng(sample_generator(self.seed, self.epoch, index)):
            return self.transform(img), target


def build_classification_dataset(is_train: bool, args, build_transform: Callable) -> CheckedImageFolder:
    """<data_path>/train or <data_path>/val as an ImageFolder (one root: the classes must agree)."""
    paths = [args.data_path] if isinstance(args.data_path, str) else list(args.data_path)
    if len(paths) != 1:
        raise DataError(f"finetuning and linear probing take one --data_path, got {len(paths)}")
    root = os.path.join(paths[0], "train" if is_train else "val")
    dataset = CheckedImageFolder(root, build_transform(is_train, args), seed=args.seed)
    if args.nb_classes < len(dataset.classes):
        raise DataError(f"{root} has {len(dataset.classes)} classes but --nb_classes is {args.nb_classes}: "
                        f"pass --nb_classes {len(dataset.classes)}")
    return dataset
