"""The compact mask cache: for one coverage ratio, only the chosen segment of every image, so that
training never parses a SAM JSON file or decodes a PNG it does not use (util/mask_cache_build.py
writes it, in parallel and resumably, from any mask layout of util/mask_sources).

    <root>/masks_cache/coverage_<C>.bin        the chosen RLE count strings, concatenated (ASCII)
    <root>/masks_cache/coverage_<C>.npz        keys (relative image paths, sorted), offset, length,
                                               height, width (length -1: no segment), the mask
                                               layout, the size + mtime of each image's mask
                                               index file (the JSON, table.txt or metadata.csv),
                                               and the mtime of each folder holding those files

Staleness without a stat per file: adding, removing, renaming or atomically replacing a mask file
changes the mtime of its folder, so a start stats the ~1,000 folders (one per class for the json
layout) and then every file in a folder that changed, plus SAMPLED_FILES files drawn at random from
the rest, for edits in place (a regeneration in place touches every file, so a sample finds it).
``tools/check_dataset.py`` checks every file.
"""
from __future__ import annotations

import os
import time

import numpy as np

from util.scan_index import SETTLE_S, folder_mtimes, pack_strings, unpack_strings
from util.mask_sources import MaskSource, open_mask_source, stem_of
from util.sam_masks import MaskFileError, decode_segmentation


SAMPLED_FILES = 1024  # mask files of unchanged folders stat'ed at each check, for edits in place


def mask_folders(source: MaskSource, keys: list[str]) -> dict[str, np.ndarray]:
    """The cache index's record of the folders holding the keys' mask index files: each key's
    folder (an index into the folder list), the folders relative to masks/, and their mtimes now
    (-1 where a folder changed within SETTLE_S: too fresh to trust on coarse clocks). Taken before
    the files themselves are stat'ed, so a change made during the build shows as a changed folder."""
    ids: dict[str, int] = {}
    key_folder = np.empty(len(keys), np.int32)
    cut = len(os.path.join(source.mask_root, ""))
    for i, rel in enumerate(keys):
        key_folder[i] = ids.setdefault(os.path.dirname(source.index_file(rel))[cut:], len(ids))
    started = time.time()
    mtimes = folder_mtimes(source.mask_root, list(ids))
    mtimes[mtimes / 1e9 > started - SETTLE_S] = -1
    return {"mask_folders": pack_strings(list(ids)), "mask_folder_mtime_ns": mtimes, "key_folder": key_folder}


def mask_cache_paths(root: str, coverage_ratio: float) -> tuple[str, str]:
    base = os.path.join(root, "masks_cache", f"coverage_{coverage_ratio:g}")
    return base + ".bin", base + ".npz"


class MaskCache:
    """Reads chosen segments from the cache: one pread and one RLE decode per sample. ``source``
    is the root's mask reader: the cache must come from the same layout and be newer than its
    index files (see the module's docstring; ``every_file``: stat them all; ``check_files=False``
    leaves the check to another process that just did it: each node's first rank, see
    util/image_roots.py)."""

    def __init__(self, root: str, coverage_ratio: float, source: MaskSource | None = None,
                 check_files: bool = True, every_file: bool = False):
        self.bin_path, index_path = mask_cache_paths(root, coverage_ratio)
        rebuild = (f"Rebuild it: python tools/build_mask_cache.py --data_path {root} --coverage_ratio "
                   f"{coverage_ratio:g} (or delete {os.path.dirname(index_path)} to read masks/ itself)")
        try:
            with np.load(index_path) as index:
                keys = index["keys"].tolist()
                self.offset, self.length = index["offset"], index["length"]
                self.height, self.width = index["height"], index["width"]
                built_from = (index["mask_bytes"], index["mask_mtime_ns"]) if "mask_bytes" in index else None
                built_for = float(index["coverage_ratio"])
                built_format = str(index["mask_format"]) if "mask_format" in index else "json"
                folders = ({k: index[k] for k in ("mask_folders", "mask_folder_mtime_ns", "key_folder")}
                           if "key_folder" in index else None)  # None: a cache from before folder records
        except Exception as e:  # noqa: BLE001 - a damaged index, whatever numpy says about it
            raise MaskFileError(f"mask cache index {index_path} is unreadable ({type(e).__name__}: {e}). "
                                f"{rebuild}") from None
        if source is None:
            source = open_mask_source(os.path.join(root, "masks"), {stem_of(k) for k in keys}, shared_counters=False)
        n = len(keys)
        used = self.length >= 0
        if not (len(self.offset) == len(self.length) == len(self.height) == len(self.width) == n):
            raise MaskFileError(f"mask cache index {index_path} is inconsistent (array lengths differ). {rebuild}")
        expected = int(self.length[used].sum()) if used.any() else 0
        actual = os.path.getsize(self.bin_path)
        ends = self.offset[used] + self.length[used]
        if (actual != expected or (used.any() and (self.offset[used].min() < 0 or ends.max() > actual))
                or (self.height[used] <= 0).any() or (self.width[used] <= 0).any()):
            raise MaskFileError(f"mask cache {self.bin_path} is {actual} bytes but its index describes "
                                f"{expected} (truncated or from another build). {rebuild}")
        if built_for != float(coverage_ratio):
            raise MaskFileError(f"mask cache {index_path} was built for coverage {built_for:g}, not {coverage_ratio:g}. "
                                f"{rebuild}")
        if built_from is None:
            raise MaskFileError(f"mask cache {index_path} records no mask file dates (an older version built it), "
                                f"so it cannot be checked against the mask files. {rebuild}")
        if built_format != source.format:
            raise MaskFileError(f"mask cache {index_path} was built from {built_format} masks, but masks/ now holds the "
                                f"{source.format} layout. {rebuild}")
        stale = []
        if check_files:
            rows = None if every_file or folders is None else self._rows_to_check(source.mask_root, folders)
            stale = self._stale_entries(source, keys, *built_from, rows)
        if stale:
            raise MaskFileError(f"mask cache {index_path} is older than {len(stale)} mask file(s) (edited, replaced or "
                                f"deleted since it was built), e.g. {stale[0]}. {rebuild}")
        self._keys = keys  # the rows' image paths; the dataset keeps an array of rows instead
        self._row: dict[str, int] | None = None  # built on the first lookup by path
        self.rebuild_hint = rebuild
        self._fd = None  # opened lazily: one descriptor per data-loader worker

    @staticmethod
    def _rows_to_check(mask_root: str, folders: dict[str, np.ndarray]) -> np.ndarray:
        """The rows whose files are stat'ed: all in a folder whose mtime changed since the build,
        and SAMPLED_FILES drawn at random from the others (one stat per folder)."""
        now = folder_mtimes(mask_root, unpack_strings(folders["mask_folders"]))
        changed = (now != folders["mask_folder_mtime_ns"])[folders["key_folder"]]
        others = np.flatnonzero(~changed)
        if len(others) > SAMPLED_FILES:
            others = np.random.default_rng().choice(others, SAMPLED_FILES, replace=False)
        return np.union1d(np.flatnonzero(changed), others)

    @staticmethod
    def _stale_entries(source: MaskSource, keys: list[str], sizes: np.ndarray, mtimes: np.ndarray,
                       rows: np.ndarray | None = None) -> list[str]:
        """Mask index files (of these rows; None: all) whose size or mtime differ from when the
        cache was built (one stat each)."""
        if rows is not None:
            keys, sizes, mtimes = [keys[i] for i in rows.tolist()], sizes[rows], mtimes[rows]
        stale = []
        for rel, size, mtime in zip(keys, sizes.tolist(), mtimes.tolist()):
            path = source.index_file(rel)
            try:
                st = os.stat(path)
            except OSError:
                stale.append(path)
                continue
            if st.st_size != size or st.st_mtime_ns != mtime:
                stale.append(path)
        return stale

    @staticmethod
    def exists(root: str, coverage_ratio: float) -> bool:
        return all(os.path.exists(p) for p in mask_cache_paths(root, coverage_ratio))

    def rows_for(self, rels: list[str]) -> np.ndarray:
        """The cache row of each image path (-1: not in the cache), as one int64 array."""
        row = self._row if self._row is not None else {k: i for i, k in enumerate(self._keys)}
        return np.fromiter((row.get(r, -1) for r in rels), dtype=np.int64, count=len(rels))

    def forget_keys(self) -> None:
        """Drops the per-image path strings (the loader's workers use rows only)."""
        self._keys, self._row = [], None

    def _rows(self) -> dict[str, int]:
        if self._row is None:
            self._row = {k: i for i, k in enumerate(self._keys)}
        return self._row

    def __contains__(self, rel: str) -> bool:
        return rel in self._rows()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def load(self, rel: str, image_size: tuple[int, int]) -> np.ndarray:
        return self.load_row(self._rows()[rel], image_size, rel)

    def load_row(self, i: int, image_size: tuple[int, int], rel: str = "") -> np.ndarray:
        """The mask in row i (``rel`` names it in an error)."""
        if self.length[i] < 0:
            w, h = image_size
            return np.zeros((h, w), dtype=np.uint8)
        if self._fd is None:
            self._fd = os.open(self.bin_path, os.O_RDONLY)
        counts = os.pread(self._fd, int(self.length[i]), int(self.offset[i]))
        segmentation = {"size": [int(self.height[i]), int(self.width[i])], "counts": counts}
        try:
            return decode_segmentation(segmentation)
        except ValueError as e:
            raise MaskFileError(f"mask cache {self.bin_path}, entry {rel}: {e}. {self.rebuild_hint}") from None
