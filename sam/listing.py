"""The one listing of a root's masks/ at start-up: which images have masks, which layout the root
uses, and the original segmae code's list of images without masks.

Each image folder's sorted mask listing is compared with the folder's image stems as whole strings
(one regular-expression substitution turns image names into mask names), so a million images cost
no Python call each; only a folder that differs is compared name by name, which names every
missing mask and every pair of images that would share one.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, NamedTuple

import numpy as np

from sam.files import MASK_SUFFIX, MaskFileError, check_unique_stems

MASK_FORMATS = ("json", "segmae", "amg")
SEGMAE_TABLE = "table.txt"
AMG_METADATA = "metadata.csv"
AMG_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
              "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h").split(",")
EMPTY_LIST = "emptyfiles.txt"


# Each name's extension (the last dot on) among NUL-joined file names: one regex pass per folder
# turns a folder's image names into their stems without a Python call per image.
_EXTENSION = re.compile(r"\.[^.\0]*(?![^\0])")


class FolderMasks(NamedTuple):
    """One listed folder of masks/: its file names (sorted, joined by NUL) and its non-hidden
    sub-folder names (sorted). Symbolic links are followed; a link whose target is gone is left out."""
    files: str
    dirs: list[str]

    def missing(self, stems: list[str], folder_layout: bool) -> list[int]:
        """Indices into ``stems`` of the images without masks here, in the json or a folder layout."""
        have = set(self.dirs) if folder_layout else set(self.files.split("\0"))
        names = stems if folder_layout else json_names("\0".join(stems)).split("\0")
        return [j for j, name in enumerate(names) if name not in have]


def list_folder(path: str) -> FolderMasks:
    """One folder of masks/ (empty when it is absent or unreadable)."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:
        return FolderMasks("", [])
    files = [e.name for e in entries if e.is_file(follow_symlinks=False)]  # plain files: the listing says so
    dirs = []
    if len(files) < len(entries):  # links, folders and the rare other kinds: one look each
        for entry in entries:
            if entry.name.startswith(".") or entry.is_file(follow_symlinks=False):
                continue
            try:
                if entry.is_dir():  # follows links
                    dirs.append(entry.name)
                elif not entry.is_symlink() or os.path.exists(entry.path):  # not a link to nothing
                    files.append(entry.name)
            except OSError:
                continue
    files.sort()
    dirs.sort()
    return FolderMasks("\0".join(files), dirs)


def json_names(stems: str) -> str:
    """<stem>.json for each of the NUL-joined stems, joined the same way (string operations on the
    whole text, no call per image)."""
    return (stems + "\0").replace("\0", MASK_SUFFIX + "\0")[:-1]


def _walk(mask_root: str, groups: Iterable[tuple[str, str]]) -> tuple[list[FolderMasks], dict[str, str]]:
    """masks/<folder> listed for each (folder relative to masks/, the NUL-joined stems of its
    images) of ``groups``, and the layouts seen, with an example each (the first image folder of
    each listed folder is looked into for table.txt or metadata.csv). Folders named after an image
    are not entered; folders without images are not listed."""
    found: list[FolderMasks] = []
    seen: dict[str, str] = {}
    for folder, stems in groups:
        path = os.path.join(mask_root, folder)
        masks = list_folder(path)
        if "json" not in seen:
            first = next((n for n in masks.files.split("\0") if n.endswith(MASK_SUFFIX) and not n.startswith(".")),
                         None)
            if first is not None:
                seen["json"] = os.path.join(path, first)
        # the first sub-folder named after an image (a substring search, no set of the stems)
        listed_stems = f"\0{stems}\0" if masks.dirs else ""
        first = next((d for d in masks.dirs if f"\0{d}\0" in listed_stems), None)
        if first is not None:
            first = os.path.join(path, first)
            for fmt, index in (("segmae", SEGMAE_TABLE), ("amg", AMG_METADATA)):
                if os.path.exists(os.path.join(first, index)):
                    seen.setdefault(fmt, os.path.join(first, index))
                    break
        found.append(masks)
    return found, seen


def scan(mask_root: str, stems: set[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Which of these image stems (paths relative to train/ without extension) have a .json file
    and which a folder in masks/, and the layouts seen (an example each): one listing per folder."""
    by_folder: dict[str, list[str]] = {}
    for stem in stems:
        folder, _, name = stem.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    found, seen = _walk(mask_root, ((folder, "\0".join(names)) for folder, names in by_folder.items()))
    listed: dict[str, set[str]] = {"json": set(), "folders": set()}
    for (folder, names), masks in zip(by_folder.items(), found):
        prefix = f"{folder}/" if folder else ""
        for listing, folder_layout in (("json", False), ("folders", True)):
            lacking = set(masks.missing(names, folder_layout))
            listed[listing].update(prefix + name for j, name in enumerate(names) if j not in lacking)
    return listed, seen


class MaskCheck(NamedTuple):
    """What the start-up listing of masks/ found for a list of images."""
    format: str  # the layout (detected, or as asked)
    missing: np.ndarray  # indices of the images without masks in that layout


def check_images(mask_root: str, images, mask_format: str = "auto") -> MaskCheck:
    """The layout of masks/ and the images without masks, for every image of ``images`` (an
    inputs.images.ImageList: paths relative to train/): one listing of masks/<folder> per image
    folder, compared with the folder's image stems as whole strings. Two images that would share
    a mask (x.JPEG and x.png) and a masks/ that mixes layouts are errors naming them."""
    if mask_format not in (None, "auto", *MASK_FORMATS):
        raise MaskFileError(f"unknown mask format {mask_format!r}; choose one of auto, {', '.join(MASK_FORMATS)}")
    runs = [(folder, start, end, _EXTENSION.sub("", names)) for folder, start, end, names in images.folders()]
    found, seen = _walk(mask_root, ((folder, stems) for folder, _, _, stems in runs))
    if mask_format in (None, "auto"):
        mask_format = _detect(mask_root, seen)
    missing, shared = [], []
    for (_, start, end, stems), masks in zip(runs, found):
        exact = masks.files == json_names(stems) if mask_format == "json" else "\0".join(masks.dirs) == stems
        if exact:  # the usual case: one mask (file or folder) per image and nothing else, so no stem twice
            continue
        stems = stems.split("\0")
        if len(set(stems)) < len(stems):  # x.JPEG and x.png: named by the check below
            shared += [images.rel(i) for i in range(start, end)]
        missing += [start + j for j in masks.missing(stems, mask_format != "json")]
    check_unique_stems(shared, images.root, [stem_of(rel) for rel in shared])
    return MaskCheck(mask_format, np.asarray(missing, dtype=np.int64))


def detect_format(mask_root: str, stems: set[str]) -> str:
    """The layout of masks/: .json files, or per-image folders with table.txt (segmae) or
    metadata.csv (amg); a mix is an error naming both layouts with an example of each."""
    return _detect(mask_root, scan(mask_root, stems)[1])


def _detect(mask_root: str, seen: dict[str, str]) -> str:
    if len(seen) > 1:
        listed = "; ".join(f"{fmt} (e.g. {example})" for fmt, example in seen.items())
        raise MaskFileError(f"{mask_root} mixes mask layouts: {listed}. Keep one layout per data root (convert the "
                            f"others with tools/convert_masks.py), or force one with --mask_format")
    return next(iter(seen), "json")


def read_empty_list(root: str, split: str = "train") -> set[str]:
    """Image file names listed in the original's emptyfiles.txt (train/ or the root), if any."""
    names: set[str] = set()
    for path in (os.path.join(root, split, EMPTY_LIST), os.path.join(root, EMPTY_LIST)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                names |= {line.strip() for line in f if line.strip()}
    return names


def stem_of(rel: str) -> str:
    return os.path.normpath(os.path.splitext(rel)[0])
