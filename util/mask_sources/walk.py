"""The one walk of a root's masks/ at start-up: which images have masks, which layout the root
uses, and the original's list of images without masks."""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from util import scan_index
from util.sam_masks import MASK_SUFFIX, MaskFileError

MASK_FORMATS = ("json", "segmae", "amg")
SEGMAE_TABLE = "table.txt"
AMG_METADATA = "metadata.csv"
AMG_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
              "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h").split(",")
EMPTY_LIST = "emptyfiles.txt"


def _walk(root: str, is_leaf: Callable[[str], bool],
          mtimes: dict[str, int] | None = None) -> Iterable[tuple[str, list[str], list[str]]]:
    """(folder relative to root, sub-folder names, file names) for every folder under root; a
    folder for which is_leaf(its relative path) holds is listed in its parent but not entered.
    Symbolic links to folders are followed; a link whose target is gone is left out. Hidden names
    (a leading dot) are skipped."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            if mtimes is not None:  # before the listing: a change after it changes the mtime again
                mtimes[rel_dir] = os.stat(os.path.join(root, rel_dir)).st_mtime_ns
            entries = list(os.scandir(os.path.join(root, rel_dir)))
        except OSError:
            continue
        dirs, files = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file(follow_symlinks=False):  # a plain file, from the listing alone: the usual case
                files.append(entry.name)
                continue
            try:
                is_dir = entry.is_dir()  # follows links
                exists = is_dir or not entry.is_symlink() or os.path.exists(entry.path)
            except OSError:
                continue
            if not exists:  # a link whose target is gone
                continue
            (dirs if is_dir else files).append(entry.name)
        yield rel_dir, dirs, files
        for name in dirs:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not is_leaf(rel):
                stack.append(rel)


def scan(mask_root: str, stems: set[str], stems_digest: str = "") -> tuple[dict[str, set[str]], dict[str, str]]:
    """One walk of masks/: the image stems that have a .json file, those that have a folder, and
    the layouts seen with an example each (the first image folder of every class folder is looked
    into for table.txt or metadata.csv). Folders named after an image are not entered.
    With ``stems_digest`` (a digest of the image list the stems come from), the walk is saved and
    read again while no walked folder changed (util/scan_index.py)."""
    if stems_digest:
        saved = scan_index.load_mask_listing(mask_root, stems_digest)
        if saved is not None:
            return saved
    started = time.time()
    mtimes: dict[str, int] = {}
    listed: dict[str, set[str]] = {"json": set(), "folders": set()}
    seen: dict[str, str] = {}
    cut = len(MASK_SUFFIX)
    for rel_dir, dirs, files in _walk(mask_root, lambda rel: rel in stems, mtimes):
        prefix = f"{rel_dir}/" if rel_dir else ""  # rel_dir is normalised and names hold no '/'
        found = [name for name in files if name.endswith(MASK_SUFFIX)]
        if found:
            listed["json"].update(prefix + name[:-cut] for name in found)
            seen.setdefault("json", os.path.join(mask_root, rel_dir, found[0]))
        folders = [d for d in dirs if prefix + d in stems]
        listed["folders"].update(prefix + d for d in folders)
        if folders:
            path = os.path.join(mask_root, rel_dir, folders[0])
            for fmt, index in (("segmae", SEGMAE_TABLE), ("amg", AMG_METADATA)):
                if os.path.exists(os.path.join(path, index)):
                    seen.setdefault(fmt, os.path.join(path, index))
                    break
    if stems_digest:
        scan_index.save_mask_listing(mask_root, stems_digest, listed, seen, mtimes, started)
    return listed, seen


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


def scanned_stems(rels: list[str]) -> list[str]:
    """stem_of for each path of a folder scan (already normalised, no hidden names), without an
    os.path call per image: the text before the last dot of the file name."""
    out = []
    for rel in rels:
        dot = rel.rfind(".")
        out.append(rel[:dot] if dot > rel.rfind("/") + 1 else stem_of(rel))
    return out
