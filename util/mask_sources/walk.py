"""The one listing of a root's masks/ at start-up: which images have masks, which layout the root
uses, and the original's list of images without masks."""
from __future__ import annotations

import os
import re
import time
from typing import Iterable, NamedTuple

import numpy as np

from util import scan_index
from util.images import ImageList
from util.mask_sources.listing import Listing, ListedInBackground, list_folder
from util.sam_masks import MASK_SUFFIX, MaskFileError, check_unique_stems

MASK_FORMATS = ("json", "segmae", "amg")
SEGMAE_TABLE = "table.txt"
AMG_METADATA = "metadata.csv"
AMG_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
              "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h").split(",")
EMPTY_LIST = "emptyfiles.txt"


# Each name's extension (the last dot on) among NUL-joined file names: one regex pass per folder
# turns a folder's image names into their stems without a Python call per image.
_EXTENSION = re.compile(r"\.[^.\0]*(?![^\0])")


def json_names(stems: str) -> str:
    """<stem>.json for each of the NUL-joined stems, joined the same way (string operations on the
    whole text, no call per image)."""
    return (stems + "\0").replace("\0", MASK_SUFFIX + "\0")[:-1]


class FolderMasks(NamedTuple):
    """One listed folder of masks/ (util/mask_sources/listing.py)."""
    files: str  # its file names, sorted, joined by NUL
    dirs: list[str]  # its sub-folder names, sorted

    def missing(self, stems: list[str], folder_layout: bool) -> list[int]:
        """Indices into ``stems`` of the images without masks here, in the json or a folder layout."""
        have = set(self.dirs) if folder_layout else set(self.files.split("\0"))
        names = stems if folder_layout else json_names("\0".join(stems)).split("\0")
        return [j for j, name in enumerate(names) if name not in have]


def _walk(mask_root: str, groups: Iterable[tuple[str, str]], mtimes: dict[str, int] | None = None,
          listed: dict[str, Listing] | None = None) -> tuple[list[FolderMasks], dict[str, str]]:
    """The one listing of masks/ at start-up: masks/<folder> for each (folder relative to masks/,
    the NUL-joined stems of its images) of ``groups``, taken from ``listed`` (a listing made in the
    background) or listed here; and the layouts seen, with an example each (the first image folder
    of each listed folder is looked into for table.txt or metadata.csv). Folders named after an
    image are not entered; folders without images are not listed."""
    found: list[FolderMasks] = []
    seen: dict[str, str] = {}
    listed = listed or {}
    for folder, stems in groups:
        path = os.path.join(mask_root, folder)
        mtime, files, dirs = listed.get(folder) or list_folder(path)
        if mtimes is not None:
            mtimes[folder] = mtime
        if "json" not in seen:
            first = next((n for n in files.split("\0") if n.endswith(MASK_SUFFIX) and not n.startswith(".")), None)
            if first is not None:
                seen["json"] = os.path.join(path, first)
        # the first sub-folder named after an image (a substring search, no set of the stems)
        listed_stems = f"\0{stems}\0" if dirs else ""
        first = next((d for d in dirs if f"\0{d}\0" in listed_stems), None)
        if first is not None:
            first = os.path.join(path, first)
            for fmt, index in (("segmae", SEGMAE_TABLE), ("amg", AMG_METADATA)):
                if os.path.exists(os.path.join(first, index)):
                    seen.setdefault(fmt, os.path.join(first, index))
                    break
        found.append(FolderMasks(files, dirs))
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


def check_images(mask_root: str, images: ImageList, mask_format: str = "auto",
                 background: ListedInBackground | None = None,
                 saved: tuple[str, str, np.ndarray] | None = None) -> MaskCheck:
    """The layout of masks/ and the images without masks, for every image of ``images`` (paths
    relative to train/): one listing of masks/<folder> per image folder (``background``: most of
    them listed by a second process meanwhile), compared with the folder's image stems as whole
    strings, so a million images cost no Python call each. Two images that would share a mask
    (x.JPEG and x.png) and a masks/ that mixes layouts are errors naming them. The result is saved
    and read again while no listed folder changed (util/scan_index.py); ``saved``: that saved check,
    from a caller that read it already (one that lists in the ``background`` found none)."""
    if mask_format not in (None, "auto", *MASK_FORMATS):
        raise MaskFileError(f"unknown mask format {mask_format!r}; choose one of auto, {', '.join(MASK_FORMATS)}")
    key = f"{scan_index.MASK_CHECK}{mask_format}:{images.digest()}"
    if saved is None and background is None:
        saved = scan_index.load_mask_check(mask_root)
    if saved is not None and saved[0] == key:
        return MaskCheck(*saved[1:])
    started = background.started if background is not None else time.time()  # for the saved check's settling
    runs = [(folder, start, end, _EXTENSION.sub("", names)) for folder, start, end, names in images.folders()]
    mtimes: dict[str, int] = {}
    found, seen = _walk(mask_root, ((folder, stems) for folder, _, _, stems in runs), mtimes,
                        background.result() if background is not None else None)
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
    result = MaskCheck(mask_format, np.asarray(missing, dtype=np.int64))
    scan_index.save_mask_check(mask_root, key, *result, mtimes, started)
    return result


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
