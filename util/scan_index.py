"""Saved folder scans (the image split's, and the check of masks/ against it), so that a restart
(every benchmark chunk, every rank) does not list 1.28M files again.

The index of a split (``<data root>/.segmae_scan-<split>.npz`` beside the split's folder, or under
``$XDG_CACHE_HOME/segmae/scans/`` when the data is read-only) holds the scan's paths, labels, classes and the modification time of
every folder it walked. It is used only while every one of those folders still has its recorded
mtime: adding, removing or renaming a file or folder changes the mtime of the folder holding it,
so one stat per folder (about a thousand for ImageNet), not one per file, tells whether the tree
changed. Editing an image in place changes no folder, and needs no rescan: the scan lists paths.
A folder whose mtime is within ``SETTLE_S`` of the scan is too fresh to trust (file systems with
coarse timestamps), and such a scan is not saved. ``SEGMAE_SCAN_INDEX=0`` turns it off.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

INDEX_PREFIX = ".segmae_scan-"  # hidden, and outside the split: writing it changes no scanned folder
VERSION = 1
SETTLE_S = 2.0


def index_paths(split_root: str) -> list[str]:
    """Where the index of this split may be: beside the data, then in the user's cache."""
    real = os.path.realpath(split_root)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    parent, split = os.path.split(real)
    return [os.path.join(parent, f"{INDEX_PREFIX}{split}.npz"), os.path.join(cache, "segmae", "scans", f"{digest}.npz")]


def pack_text(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8)


def unpack_text(buffer: np.ndarray) -> str:
    return buffer.tobytes().decode("utf-8", "surrogateescape")


def pack_strings(strings: list[str]) -> np.ndarray:
    """Strings as one NUL-separated uint8 array (a list of a million paths is one numpy object)."""
    return pack_text("\0".join(strings))


def unpack_strings(buffer: np.ndarray) -> list[str]:
    text = unpack_text(buffer)
    return text.split("\0") if text else []


def folder_mtimes(root: str, folders: list[str]) -> np.ndarray:
    """The mtime (ns) of each folder relative to root, one stat each; -2 for one that is gone (never
    equal to a recorded mtime, nor to -1, which marks a folder too fresh to trust)."""
    def mtime(rel: str) -> int:
        try:
            return os.stat(os.path.join(root, rel)).st_mtime_ns
        except OSError:
            return -2
    return np.array([mtime(rel) for rel in folders], dtype=np.int64)


def folders_unchanged(split_root: str, folders: list[str], mtimes: np.ndarray) -> bool:
    return bool(np.array_equal(folder_mtimes(split_root, folders), mtimes))


def enabled() -> bool:
    return os.environ.get("SEGMAE_SCAN_INDEX", "1") != "0"


def _load(root: str, key: str = "", key_prefix: bool = False) -> dict | None:
    """The arrays saved for this folder and key (``key_prefix``: any key starting so) if every
    folder it recorded is unchanged."""
    if not enabled():
        return None
    for path in index_paths(root):
        try:
            with np.load(path) as index:
                saved_key = str(index["key"])
                if (int(index["version"]) != VERSION or str(index["root"]) != os.path.realpath(root)
                        or not (saved_key.startswith(key) if key_prefix else saved_key == key)):
                    continue
                saved = {name: index[name] for name in index.files}
        except Exception:  # noqa: BLE001 - absent or damaged, whatever numpy or zipfile says: scan again
            continue
        if not folders_unchanged(root, unpack_strings(saved["folders"]), saved["folder_mtimes"]):
            return None
        saved["path"] = path
        return saved
    return None


def _save(root: str, arrays: dict, folder_mtimes: dict[str, int], started: float, key: str = "") -> str | None:
    """Writes the arrays with the folders' mtimes (atomically) where it can; None when no place is
    writable or the tree was changing while it was scanned."""
    if not enabled() or max(folder_mtimes.values(), default=0) / 1e9 > started - SETTLE_S:
        return None
    arrays = {**arrays, "version": np.array(VERSION), "root": np.array(os.path.realpath(root)), "key": np.array(key),
              "folders": pack_strings(list(folder_mtimes)),
              "folder_mtimes": np.array(list(folder_mtimes.values()), dtype=np.int64)}
    for path in index_paths(root):
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return None


def load(split_root: str, key: str = "") -> dict | None:
    """The saved scan of an image split if its folders are unchanged, else None. ``key``: how the
    folder was scanned (e.g. which sub-folders were left out), part of the index's identity."""
    saved = _load(split_root, key)
    if saved is None:
        return None
    return {"classes": unpack_strings(saved["classes"]), "rels": unpack_text(saved["rels"]), "labels": saved["labels"],
            "hidden": unpack_strings(saved["hidden"]), "empty_classes": unpack_strings(saved["empty_classes"]), "path": saved["path"]}


def save(split_root: str, classes: list[str], rels: str, labels: np.ndarray, hidden: list[str],
         empty_classes: list[str], folder_mtimes: dict[str, int], started: float, key: str = "") -> str | None:
    """``rels``: the relative paths joined by NUL, as the scan makes them (and load returns them)."""
    return _save(split_root, {"classes": pack_strings(classes), "rels": pack_text(rels),
                              "labels": np.asarray(labels, dtype=np.int64), "hidden": pack_strings(hidden),
                              "empty_classes": pack_strings(empty_classes)}, folder_mtimes, started, key)


MASK_CHECK = "check:"  # the keys of saved checks of masks/ start so


def load_mask_check(mask_root: str) -> tuple[str, str, np.ndarray] | None:
    """The saved check of masks/ (util/mask_sources/walk.py), if no folder it listed changed: its
    key (the layout asked for and the image list's digest), the layout and the indices of the
    images without masks. Read once at start-up: it also tells a restart from a first start."""
    saved = _load(mask_root, MASK_CHECK, key_prefix=True)
    if saved is None:
        return None
    return str(saved["key"]), str(saved["format"]), saved["missing"]


def save_mask_check(mask_root: str, key: str, mask_format: str, missing: np.ndarray, folder_mtimes: dict[str, int],
                    started: float) -> str | None:
    return _save(mask_root, {"format": np.array(mask_format), "missing": np.asarray(missing, dtype=np.int64)},
                 folder_mtimes, started, key=key)
