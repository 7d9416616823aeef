"""The one scan of an ImageFolder tree (<split>/<class>/.../<image>) that every reader uses:
pretraining, finetuning, linear probing, kNN, the dataset checker and the mask generator.

Beyond torchvision's ``find_classes`` + ``make_dataset`` (same classes, same order) it
- skips hidden names (a leading dot: ``.ipynb_checkpoints/``, macOS ``._x.JPEG`` AppleDouble files)
  and counts them;
- refuses a folder reached twice (a symlink loop, or two links to one folder), which would
  otherwise be read until the OS gives up, multiplying the data set silently;
- maps a second split (val/) by the first split's classes, so that labels agree;
- names a flat folder of images (the official ImageNet val tarball) and the tool that sorts it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from torchvision.datasets.folder import IMG_EXTENSIONS

from util.images import DataError

SORT_VAL_HINT = ("sort it into class folders with python tools/sort_imagenet_val.py --val_dir {root} "
                 "--labels LOC_val_solution.csv (Kaggle) or --labels ILSVRC2012_validation_ground_truth.txt "
                 "(devkit)")


@dataclass
class FolderScan:
    """What one split holds: classes in torchvision's order and (path, class index) samples."""
    root: str
    classes: list[str]
    class_to_idx: dict[str, int]
    samples: list[tuple[str, int]]
    hidden: list[str] = field(default_factory=list)  # skipped hidden files and folders (paths)
    empty_classes: list[str] = field(default_factory=list)  # class folders without an image

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image(name: str) -> bool:
    return not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)


def _folder_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk_images(folder: str, hidden: list[str] | None = None,
                seen: dict[tuple[int, int], str] | None = None) -> list[str]:
    """Every image under ``folder`` (symlinks followed), in torchvision's order (folders sorted by
    path, files by name). A folder reached twice is an error naming both paths."""
    seen = {} if seen is None else seen
    hidden = [] if hidden is None else hidden
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        key = _folder_key(dirpath)
        if key in seen:
            raise DataError(f"{dirpath} is the folder {seen[key]} reached a second time (a symlink loop, or two "
                            f"links to one folder): its images would be read again and again. Remove the link "
                            f"(find {folder} -type l lists the links)")
        seen[key] = dirpath
        hidden += [os.path.join(dirpath, d) for d in dirnames if is_hidden(d)]
        hidden += [os.path.join(dirpath, f) for f in filenames if is_hidden(f)]
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found.append((dirpath, sorted(f for f in filenames if is_image(f))))
    found.sort(key=lambda item: item[0])
    return [os.path.join(d, f) for d, files in found for f in files]


def scan_image_folder(root: str, class_to_idx: dict[str, int] | None = None,
                      reference: str = "train/") -> FolderScan:
    """Scans one split. With ``class_to_idx`` (the training split's), classes are numbered by it:
    a class it lacks is an error naming them (a subset is fine: labels still agree)."""
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist or is not a folder: expected {root}/<class>/<image>")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    hidden = [e.path for e in entries if is_hidden(e.name)]
    classes = [e.name for e in entries if not is_hidden(e.name) and e.is_dir()]
    if not classes:
        flat = [e.name for e in entries if e.is_file() and is_image(e.name)]
        if flat:
            raise DataError(f"{root} holds {len(flat)} images directly, not in class folders (the official "
                            f"ImageNet val tarball is flat): " + SORT_VAL_HINT.format(root=root))
        raise DataError(f"no class folder in {root}: expected {root}/<class>/<image>")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise DataError(f"{root} has {len(unknown)} class folder(s) that {reference} lacks: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Both splits must "
                            f"use the training split's classes (remove them, or add them to {reference})")
    seen: dict[tuple[int, int], str] = {_folder_key(root): root}
    samples, empty = [], []
    for c in classes:
        paths = walk_images(os.path.join(root, c), hidden, seen)
        if not paths:
            empty.append(c)
        samples += [(p, class_to_idx[c]) for p in paths]
    ordered = sorted(class_to_idx, key=class_to_idx.get)
    return FolderScan(root, ordered, dict(class_to_idx), samples, hidden, empty)


def relative_paths(scan: FolderScan) -> list[str]:
    """The scan's image paths relative to its root, sorted (a string cut: no os.path call per image)."""
    cut = len(os.path.join(scan.root, ""))
    return sorted(p[cut:] for p, _ in scan.samples)


def list_images(image_root: str) -> list[str]:
    """Paths relative to ``image_root`` of every image a training scan reads, sorted."""
    return relative_paths(scan_image_folder(image_root))


def empty_classes_message(scan: FolderScan) -> str:
    """'N class folder(s) hold no image: <the first five>' (empty when there are none)."""
    listed = ", ".join(os.path.join(scan.root, c) for c in scan.empty_classes[:5])
    return f"{len(scan.empty_classes)} class folder(s) hold no image: {listed}" if scan.empty_classes else ""
