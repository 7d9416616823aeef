"""Classification data for finetuning, linear probing and evaluation: <data_path>/train and /val as
ImageFolders whose unreadable images raise an error naming the file, with the MAE reference's
transforms (timm's training pipeline, the linear-probing crop + flip, the evaluation centre crop),
augmentations seeded per (seed, epoch, sample)."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from torch.utils.data import Dataset

from inputs.folders import empty_classes_message, scan_image_folder
from inputs.images import DataError, load_rgb
from inputs.pretrain import EpochAware, sample_generator
from inputs.transforms import NORMALIZATIONS, as_hw
from run.files import atomic_write
from util.misc import is_main_process


def build_eval_transform(input_size, crop_pct: float = 224 / 256, normalization: str = "imagenet"):
    """Resize (short side, or both sides for a rectangular size) to size / crop_pct, centre crop."""
    h, w = as_hw(input_size)
    resize = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop((h, w)),
                      T.ToTensor(), T.Normalize(*NORMALIZATIONS[normalization])])


def build_resize_transform(input_size, normalization: str = "imagenet"):
    """--augment resize, for training and evaluation alike: the whole image resized to the input size."""
    return T.Compose([T.Resize(as_hw(input_size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(*NORMALIZATIONS[normalization])])


def _fixed_transform(is_train: bool, args):
    """The evaluation transform, or (--augment resize) the resize-only one; None: augment."""
    if args.augment == "resize":
        return build_resize_transform(args.input_size, args.normalization)
    return None if is_train else build_eval_transform(args.input_size, normalization=args.normalization)


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


def build_finetune_transform(is_train: bool, args):
    """timm's training pipeline (RandAugment, random erasing, ...) as the MAE reference, or the
    evaluation resize + centre crop."""
    fixed = _fixed_transform(is_train, args)
    if fixed is not None:
        return fixed
    _patch_timm_posterize()  # when RandAugment is built, not at import
    h, w = as_hw(args.input_size)
    mean, std = NORMALIZATIONS[args.normalization]
    return create_transform(input_size=(3, h, w), is_training=True, color_jitter=args.color_jitter,
                            auto_augment=args.aa, interpolation='bicubic', re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount, mean=mean, std=std)


def build_linprobe_transform(is_train: bool, args):
    """The reference's linear-probing augmentation: RandomResizedCrop + flip only."""
    fixed = _fixed_transform(is_train, args)
    if fixed is not None:
        return fixed
    return T.Compose([T.RandomResizedCrop(as_hw(args.input_size), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(*NORMALIZATIONS[args.normalization])])


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


class CheckedImageFolder(EpochAware, Dataset):
    """ImageFolder whose unreadable images raise an error naming the file. Augmentations are seeded
    per (seed, epoch, sample), so batches do not depend on the number of workers or ranks. With
    ``class_to_idx`` (the training split's) classes are numbered by it, so that labels agree."""

    def __init__(self, root: str, transform: Callable, seed: int = 0, class_to_idx: dict[str, int] | None = None):
        if not os.path.isdir(root):
            raise DataError(f"{root} does not exist: expected <data_path>/{os.path.basename(root)}/<class>/<image>")
        scan = scan_image_folder(root, class_to_idx)
        if class_to_idx is None and scan.empty_classes:
            raise DataError(f"{empty_classes_message(scan)}. Remove them (an empty class would still get a label)")
        if not scan.samples:
            raise DataError(f"no images found under {root}")
        self.classes, self.class_to_idx, self.samples = scan.classes, scan.class_to_idx, scan.samples
        self.root, self.transform = root, transform
        self.seed, self.epoch = seed, 0

    @property
    def targets(self) -> list[int]:
        return self.samples.labels.tolist()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = load_rgb(path)
        with seeded_global_rng(sample_generator(self.seed, self.epoch, index)):
            return self.transform(img), target


def build_classification_datasets(args, build_transform: Callable,
                                  classes_fixed: bool = False) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """<data_path>/train and <data_path>/val as ImageFolders, val numbered by train's classes.
    ``classes_fixed``: --nb_classes comes from the checkpoint being continued or evaluated."""
    paths = [args.data_path] if isinstance(args.data_path, str) else list(args.data_path)
    if len(paths) != 1:
        raise DataError(f"finetuning and linear probing take one --data_path, got {len(paths)}")
    root = paths[0]
    train = CheckedImageFolder(os.path.join(root, "train"), build_transform(True, args), seed=args.seed)
    check_class_count(args, len(train.classes), train.root, classes_fixed)
    if getattr(args, "train_subset", None):
        take_train_subset(train, args)
    val = CheckedImageFolder(os.path.join(root, "val"), build_transform(False, args), seed=args.seed,
                             class_to_idx=train.class_to_idx)
    return train, val


def class_balanced_subset(labels: np.ndarray, per_class: int | float, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every class (all of a smaller class), or of that
    fraction of each class (at least one), drawn by a generator seeded with ``seed`` alone: the
    same subset for any number of ranks and workers, and after a resume."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")  # one sort groups every class (ImageNet: 1000 classes, 1.28M images)
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    chosen = []
    for start, count in zip(starts.tolist(), counts.tolist()):
        members = order[start:start + count]
        k = per_class if isinstance(per_class, int) else max(1, int(round(per_class * count)))
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def take_train_subset(train: "CheckedImageFolder", args) -> None:
    """--train_subset: keeps the chosen images of train; the list goes to
    <output_dir>/train_subset.txt (relative path, tab, class index)."""
    keep = class_balanced_subset(train.samples.labels, args.train_subset, args.seed)
    full = len(train.samples)
    train.samples = train.samples.select(keep)
    print(f"--train_subset {args.train_subset}: {len(keep)} of {full} training images "
          f"({len(np.unique(train.samples.labels))} classes), seed {args.seed}")
    if args.output_dir and is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        with atomic_write(os.path.join(args.output_dir, "train_subset.txt"), "w") as f:
            f.writelines(f"{train.samples.rel(i)}\t{int(train.samples.labels[i])}\n" for i in range(len(keep)))


def check_class_count(args, n_classes: int, root: str, from_checkpoint: bool = False) -> None:
    """--nb_classes left out: the training folder's class count. Given (or taken from the checkpoint
    being continued): fewer than the folder's classes is an error, more a warning (a subset of a
    larger label set, e.g. 100 ImageNet classes scored by a 1000-way head)."""
    if not (from_checkpoint or "nb_classes" in getattr(args, "given_flags", [])):
        if args.nb_classes != n_classes:
            print(f"--nb_classes {n_classes}: the class folders in {root}")
        args.nb_classes = n_classes
    elif args.nb_classes < n_classes:
        raise DataError(f"{root} has {n_classes} classes but --nb_classes is {args.nb_classes}: "
                        f"pass --nb_classes {n_classes} (or leave it out)")
    elif args.nb_classes > n_classes:
        print(f"WARNING: --nb_classes {args.nb_classes} but {root} has {n_classes} classes: the head has "
              f"{args.nb_classes - n_classes} outputs no label uses (right for a subset of a larger label set)")
