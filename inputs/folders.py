"""The one scan of an ImageFolder tree (<split>/<class>/.../<image>) that every reader uses:
pretraining, finetuning, linear probing, kNN, the dataset checker and the mask generator.

Beyond torchvision's ``find_classes`` + ``make_dataset`` (same classes, same order) it
- skips hidden names (a leading dot: ``.ipynb_checkpoints/``, macOS ``._x.JPEG`` AppleDouble files)
  and counts them;
- refuses a folder reached twice (a symlink loop, or two links to one folder), which would
  otherwise be read until the OS gives up, multiplying the data set silently;
- maps a second split (val/) by the first split's classes, so that labels agree;
- names a flat folder of images (the official ImageNet val tarball) and the tool that sorts it;
- keeps the result as an ``ImageList`` (inputs/images.py): the paths in one byte buffer and the
  labels in one numpy array, not a list of tuples;
- costs no Python call per image: each folder is listed once and its image names are picked out
  of the NUL-joined listing with one regular expression.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from inputs.images import DataError, ImageList

SORT_VAL_HINT = ("sort it into class folders with python tools/sort_imagenet_val.py --val_dir {root} "
                 "--labels LOC_val_solution.csv (Kaggle) or --labels ILSVRC2012_validation_ground_truth.txt "
                 "(devkit)")


@dataclass
class FolderScan:
    """What one split holds: classes in torchvision's order and (path, class index) samples."""
    root: str
    classes: list[str]
    class_to_idx: dict[str, int]
    samples: ImageList
    hidden: list[str] = field(default_factory=list)  # skipped hidden files and folders (paths)
    empty_classes: list[str] = field(default_factory=list)  # class folders without an image

    @property
    def targets(self) -> list[int]:
        return self.samples.labels.tolist()


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


# The non-hidden names with an image extension among NUL-joined names: one regex pass per folder
# instead of a Python call per file (this runs for every image of the tree at a first start).
_IMAGE_NAMES = re.compile(r"(?<![^\0])[^.\0][^\0]*(?:%s)(?![^\0])" % "|".join(re.escape(e) for e in IMG_EXTENSIONS),
                          re.IGNORECASE | re.ASCII)


def _folder_entries(path: str, plain: bool) -> tuple[list[str], list[str], list[str]]:
    """(image names, sub-folder names, hidden names) of one folder as os.walk(followlinks=True)
    sees it. ``plain``: the folder has no sub-folder (st_nlink == 2), so a listed name with an image
    extension is taken as a file without a call of its own (only a link to a folder named like an
    image would be misread, and then fails, named, when read); other names are looked at one by
    one. An unreadable folder is empty, as os.walk has it."""
    try:
        if plain:
            names = os.listdir(path)
            images = _IMAGE_NAMES.findall("\0".join(names))
            if len(images) == len(names):  # the usual case
                return images, [], []
            taken = set(images)
            rest = [(name, None) for name in names if name not in taken]
        else:  # sub-folders: the listing's file types tell them apart
            with os.scandir(path) as it:
                images, rest = [], [(e.name, e) for e in it]
    except OSError:
        return [], [], []
    dirs, hidden = [], []
    for name, entry in rest:
        if is_hidden(name):
            hidden.append(name)
        elif entry.is_dir() if entry is not None else os.path.isdir(os.path.join(path, name)):  # follows links
            dirs.append(name)
        elif name.lower().endswith(IMG_EXTENSIONS):
            images.append(name)
    return images, dirs, hidden


def walk_images(folder: str, hidden: list[str] | None = None,
                seen: dict[tuple[int, int], str] | None = None) -> list[tuple[str, list[str]]]:
    """Every folder under ``folder`` (symlinks followed) with its image names, in torchvision's
    order (folders sorted by path, files by name). A folder reached twice is an error naming both
    paths."""
    seen = {} if seen is None else seen
    hidden = [] if hidden is None else hidden
    found: list[tuple[str, list[str]]] = []
    stack = [folder]
    while stack:
        dirpath = stack.pop()
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        key = st.st_dev, st.st_ino
        if key in seen:
            raise DataError(f"{dirpath} is the folder {seen[key]} reached a second time (a symlink loop, or two "
                            f"links to one folder): its images would be read again and again. Remove the link "
                            f"(find {folder} -type l lists the links)")
        seen[key] = dirpath
        # st_nlink is 2 + the number of sub-folders on POSIX file systems (1 where it is not counted)
        images, dirs, hidden_names = _folder_entries(dirpath, plain=st.st_nlink == 2)
        hidden += [os.path.join(dirpath, name) for name in hidden_names]
        stack += [os.path.join(dirpath, d) for d in sorted(dirs, reverse=True)]
        images.sort()
        found.append((dirpath, images))
    found.sort(key=lambda item: item[0])
    return found


def scan_image_folder(root: str, class_to_idx: dict[str, int] | None = None,
                      reference: str = "train/", exclude: tuple[str, ...] = ()) -> FolderScan:
    """Scans one split. With ``class_to_idx`` (the training split's), classes are numbered by it:
    a class it lacks is an error naming them (a subset is fine: labels still agree).
    ``exclude``: sub-folders that are not classes (masks/ in a root of class folders)."""
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist or is not a folder: expected {root}/<class>/<image>")
    classes, rels, own_labels, hidden, empty = _walk_split(root, exclude)
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(f"{root} has {len(unknown)} class folder(s) that {reference} lacks: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Both splits must "
                            f"use the training split's classes (remove them, or add them to {reference})")
    labels = np.array([class_to_idx[c] for c in classes], dtype=np.int64)[own_labels] if classes else own_labels
    ordered = sorted(class_to_idx, key=class_to_idx.get)
    return FolderScan(root, ordered, dict(class_to_idx), ImageList.joined(root, rels, labels), hidden, empty)


def _walk_split(root: str, exclude: tuple[str, ...] = ()):
    """The walk itself: (classes, the relative paths joined by NUL, each image's index into classes,
    hidden names, empty classes)."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    hidden = [e.path for e in entries if is_hidden(e.name)]
    classes = [e.name for e in entries if not is_hidden(e.name) and e.is_dir() and e.name not in exclude]
    if not classes:
        flat = [e.name for e in entries if e.is_file() and is_image(e.name)]
        if flat:
            raise DataError(f"{root} holds {len(flat)} images directly, not in class folders (the official "
                            f"ImageNet val tarball is flat): " + SORT_VAL_HINT.format(root=shlex.quote(root)))
        raise DataError(f"no class folder in {root}: expected {root}/<class>/<image>")
    st = os.stat(root)
    seen: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): root}
    chunks: list[str] = []  # each folder's relative paths joined by NUL: no Python string per image
    counts = np.zeros(len(classes), dtype=np.int64)
    cut = len(os.path.join(root, ""))
    for i, c in enumerate(classes):
        for folder, names in walk_images(os.path.join(root, c), hidden, seen):
            if names:
                prefix = folder[cut:] + os.sep  # the folder's path relative to root, once per folder
                chunks.append(prefix + ("\0" + prefix).join(names))
                counts[i] += len(names)
    empty = [c for c, n in zip(classes, counts) if n == 0]
    return classes, "\0".join(chunks), np.repeat(np.arange(len(classes), dtype=np.int64), counts), hidden, empty


def relative_paths(scan: FolderScan) -> list[str]:
    """The scan's image paths relative to its root, sorted (a string cut: no os.path call per image)."""
    return sorted(scan.samples.rels())


def list_images(image_root: str) -> list[str]:
    """Paths relative to ``image_root`` of every image a training scan reads, sorted."""
    return relative_paths(scan_image_folder(image_root))


def empty_classes_message(scan: FolderScan) -> str:
    """'N class folder(s) hold no image: <the first five>' (empty when there are none)."""
    listed = ", ".join(os.path.join(scan.root, c) for c in scan.empty_classes[:5])
    return f"{len(scan.empty_classes)} class folder(s) hold no image: {listed}" if scan.empty_classes else ""
