"""A saved folder scan, so that a restart (every benchmark chunk, every rank) does not walk 1.28M
files again.

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


def _joined(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _split(buffer: np.ndarray) -> list[str]:
    text = buffer.tobytes().decode("utf-8", "surrogateescape")
    return text.split("\0") if text else []


def folders_unchanged(split_root: str, folders: list[str], mtimes: np.ndarray) -> bool:
    for rel, mtime in zip(folders, mtimes.tolist()):
        try:
            if os.stat(os.path.join(split_root, rel)).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def enabled() -> bool:
    return os.environ.get("SEGMAE_SCAN_INDEX", "1") != "0"


def load(split_root: str) -> dict | None:
    """The saved scan of this split if its folders are unchanged, else None."""
    if not enabled():
        return None
    for path in index_paths(split_root):
        try:
            with np.load(path) as index:
                if int(index["version"]) != VERSION or str(index["root"]) != os.path.realpath(split_root):
                    continue
                saved = {key: index[key] for key in index.files}
        except Exception:  # noqa: BLE001 - absent or damaged, whatever numpy or zipfile says: scan again
            continue
        folders = _split(saved["folders"])
        if not folders_unchanged(split_root, folders, saved["folder_mtimes"]):
            return None
        return {"classes": _split(saved["classes"]), "rels": _split(saved["rels"]), "labels": saved["labels"],
                "hidden": _split(saved["hidden"]), "empty_classes": _split(saved["empty_classes"]), "path": path}
    return None


def save(split_root: str, classes: list[str], rels: list[str], labels: np.ndarray, hidden: list[str],
         empty_classes: list[str], folder_mtimes: dict[str, int], started: float) -> str | None:
    """Writes the index (atomically) where it can; None when no place is writable or the tree was
    changing while it was scanned."""
    if not enabled():
        return None
    newest = max(folder_mtimes.values(), default=0) / 1e9
    if newest > started - SETTLE_S:
        return None
    arrays = {"version": np.array(VERSION), "root": np.array(os.path.realpath(split_root)),
              "classes": _joined(classes), "rels": _joined(rels), "labels": np.asarray(labels, dtype=np.int64),
              "hidden": _joined(hidden), "empty_classes": _joined(empty_classes),
              "folders": _joined(list(folder_mtimes)),
              "folder_mtimes": np.array(list(folder_mtimes.values()), dtype=np.int64)}
    for path in index_paths(split_root):
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

