"""The compact mask cache: for one coverage ratio, only the chosen segment of every image, so that
training never parses a SAM JSON file or decodes a PNG it does not use. Built from any mask
layout (sam/layouts.py), in parallel and resumably.

    <root>/masks_cache/coverage_<C>.bin        the chosen RLE count strings, concatenated (ASCII)
    <root>/masks_cache/coverage_<C>.npz        keys (relative image paths, sorted), offset, length,
                                               height, width (length -1: no segment), the mask
                                               layout, the size + mtime of each image's mask
                                               index file (the JSON, table.txt or metadata.csv),
                                               the mtime of each folder holding those files, and
                                               the frame the masks are stored in

Every mask is stored in the stored pixels' frame of its image (sam/geometry.py): one made on the
displayed, EXIF-oriented picture (amg.py's) is mapped when the cache is built, at its resolution.

Staleness without a stat per file: adding, removing, renaming or atomically replacing a mask file
changes its folder, so a start stats the ~1,000 folders (one per class for the json layout) and
then every file in a folder that changed, plus SAMPLED_FILES files drawn at random from the rest,
for edits in place (a regeneration in place touches every file, so a sample finds it). A file or
folder changed when its size or mtime differs from the record, or when its ctime is not earlier than
the cache itself (its index file's mtime): ``touch -d`` sets an mtime back, but not a ctime (so a
copy of the data made after the cache makes it stale, too). ``tools/check_dataset.py`` checks
every file.

Building: the images are cut into parts of PART_IMAGES; worker processes each build whole parts,
written atomically to <root>/masks_cache/coverage_<C>.parts/. A killed build, rerun, keeps every
part whose mask files are unchanged and builds only the rest; the finished parts are then joined
into the cache's .bin and .npz, and the parts folder is removed. Progress (images/s, ETA) goes to
stderr.
"""
from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from PIL import Image

from run.files import (atomic_write, atomic_write_json, lock_output_dir, remove_stale_temp_files, unlock_output_dir,
                       writable_dir)
from sam.files import (STORED, MaskFileError, check_rle, check_unique_stems, decode_segmentation,
                       encode_segmentation)
from sam.geometry import IMAGE_ERRORS, exif_orientation, image_error_message, mask_fit, to_stored_frame
from sam.layouts import MaskSource, closest, open_mask_source
from sam.listing import read_empty_list, stem_of

SETTLE_S = 2.0  # a folder changed this recently is too fresh to trust on file systems with coarse times
# an absolute path or a '..' part among NUL-joined relative paths: a path that leaves its root
_LEAVES_ROOT = re.compile(r"(?:^|\0)/|(?:^|[\0/])\.\.(?:[\0/]|$)")


def pack_strings(strings: list[str]) -> np.ndarray:
    """Strings as one NUL-separated uint8 array (a list of a million paths is one numpy object)."""
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def unpack_strings(buffer: np.ndarray) -> list[str]:
    text = buffer.tobytes().decode("utf-8", "surrogateescape")
    return text.split("\0") if text else []


def folder_times(root: str, folders: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The mtime and ctime (ns) of each folder relative to root, one stat each; -2 for one that is
    gone (never equal to a recorded time, nor to -1, which marks a folder too fresh to trust)."""
    times = np.full((len(folders), 2), -2, dtype=np.int64)
    for i, rel in enumerate(folders):
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            continue
        times[i] = st.st_mtime_ns, st.st_ctime_ns
    return times[:, 0], times[:, 1]


def image_folder(root: str) -> str:
    """The folder holding a root's class folders: root/train, or the root itself."""
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else root


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
    mtimes, _ = folder_times(source.mask_root, list(ids))
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
    inputs/roots.py)."""

    def __init__(self, root: str, coverage_ratio: float, source: MaskSource | None = None,
                 check_files: bool = True, every_file: bool = False):
        self.bin_path, index_path = mask_cache_paths(root, coverage_ratio)
        rebuild = (f"Rebuild it: python tools/build_mask_cache.py --data_path {shlex.quote(root)} --coverage_ratio "
                   f"{coverage_ratio:g} (or delete {os.path.dirname(index_path)} to read masks/ itself)")
        try:
            with np.load(index_path) as index:
                keys = index["keys"].tolist()
                self.offset, self.length = index["offset"], index["length"]
                self.height, self.width = index["height"], index["width"]
                # None: an older version built it (without dates, or with masks of EXIF-oriented pictures
                # kept in the frame they were made in)
                built_from = ((index["mask_bytes"], index["mask_mtime_ns"])
                              if "mask_bytes" in index and "frame" in index else None)
                built_for = float(index["coverage_ratio"])
                built_format = str(index["mask_format"]) if "mask_format" in index else "json"
                folders = ({k: index[k] for k in ("mask_folders", "mask_folder_mtime_ns", "key_folder")}
                           if "key_folder" in index else None)  # None: a cache from before folder records
            built_ns = os.stat(index_path).st_mtime_ns  # a ctime after it: changed since the build
        except Exception as e:  # noqa: BLE001 - a damaged index, whatever numpy says about it
            raise MaskFileError(f"mask cache index {index_path} is unreadable ({type(e).__name__}: {e}). "
                                f"{rebuild}") from None
        named = "\0".join(keys) + ("\0" + "\0".join(unpack_strings(folders["mask_folders"])) if folders else "")
        if _LEAVES_ROOT.search(named):  # its paths are listed and stat'ed under masks/: never outside it
            raise MaskFileError(f"mask cache index {index_path} names a path outside {root} (an absolute path or "
                                f"'..'): not this tree's cache. {rebuild}")
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
            raise MaskFileError(f"mask cache {index_path} records no mask file dates or no frame (an older version "
                                f"built it), so it cannot be checked against the mask files, nor trusted with masks "
                                f"made on EXIF-oriented pictures. {rebuild}")
        if built_format != source.format:
            raise MaskFileError(f"mask cache {index_path} was built from {built_format} masks, but masks/ now holds the "
                                f"{source.format} layout. {rebuild}")
        stale = []
        if check_files:
            rows = None if every_file or folders is None else self._rows_to_check(source.mask_root, folders, built_ns)
            sizes, mtimes = built_from
            times = np.stack([mtimes, np.full_like(mtimes, built_ns)], 1)  # per key: its mtime, the build's time
            stale = self._stale_entries(source, keys, sizes, times, rows)
        if stale:
            raise MaskFileError(f"mask cache {index_path} is older than {len(stale)} mask file(s) (edited, replaced or "
                                f"deleted since it was built), e.g. {stale[0]}. {rebuild}")
        self._keys = keys  # the rows' image paths; the dataset keeps an array of rows instead
        self._row: dict[str, int] | None = None  # built on the first lookup by path
        self.rebuild_hint = rebuild
        self._fd = None  # opened lazily: one descriptor per data-loader worker

    @staticmethod
    def _rows_to_check(mask_root: str, folders: dict[str, np.ndarray], built_ns: int) -> np.ndarray:
        """The rows whose files are stat'ed: all in a folder whose mtime changed since the build, or
        whose ctime is not earlier than the build, and SAMPLED_FILES drawn at random from the others (one
        stat per folder)."""
        mtimes, ctimes = folder_times(mask_root, unpack_strings(folders["mask_folders"]))
        changed = ((mtimes != folders["mask_folder_mtime_ns"]) | (ctimes >= built_ns))[folders["key_folder"]]
        others = np.flatnonzero(~changed)
        if len(others) > SAMPLED_FILES:
            others = np.random.default_rng().choice(others, SAMPLED_FILES, replace=False)
        return np.union1d(np.flatnonzero(changed), others)

    @staticmethod
    def _stale_entries(source: MaskSource, keys: list[str], sizes: np.ndarray, times: np.ndarray,
                       rows: np.ndarray | None = None) -> list[str]:
        """Mask index files (of these rows; None: all) whose size or mtime differ from when the
        cache was built, or whose ctime is not earlier than the build (clocks tick coarsely) (``times``: per key, the recorded
        mtime and the build's time), one stat each."""
        if rows is not None:
            keys, sizes, times = [keys[i] for i in rows.tolist()], sizes[rows], times[rows]
        stale = []
        for rel, size, (mtime, built_ns) in zip(keys, sizes.tolist(), times.tolist()):
            path = source.index_file(rel)
            try:
                st = os.stat(path)
            except OSError:
                stale.append(path)
                continue
            if st.st_size != size or st.st_mtime_ns != mtime or st.st_ctime_ns >= built_ns:  # the same tick: not provably before
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


# ------------------------------------------------------------------------------------------------
# building the cache

PART_IMAGES = 2048  # images per part: what a killed build can lose, per worker


def cache_entry(source: MaskSource, rel: str, coverage_ratio: float, image_path: str) -> tuple[bytes, int, int] | None:
    """(RLE counts, H, W) of the image's chosen segment in the stored pixels' frame, checked as
    training checks it (valid RLE, the size policy against the image's header); None when it has
    no segment."""
    segments = source.segments(rel)
    seg = closest(segments, coverage_ratio)
    if seg is None:
        return None
    where = source.location(rel)
    try:
        with Image.open(image_path) as im:
            image_wh, orientation = im.size, exif_orientation(im)
    except IMAGE_ERRORS as e:
        raise MaskFileError(image_error_message(image_path, e)) from None
    rule = None
    if seg.size is not None:  # the size policy before anything is decoded
        try:
            rule = mask_fit(seg.size, image_wh, orientation, segments.frame)
        except ValueError as e:
            raise MaskFileError(f"{where}: {e}") from None
    try:
        if seg.rle is not None and not isinstance(seg.rle["counts"], list) and rule != "orient":
            check_rle(seg.rle)
            rle = seg.rle
        else:  # a PNG, an uncompressed RLE or a mask to map: stored compressed (decoding checks it)
            mask = seg.decode() if seg.rle is None else decode_segmentation(seg.rle)
            if rule is None:  # a PNG: its size is known now
                try:
                    rule = mask_fit(mask.shape, image_wh, orientation, segments.frame)
                except ValueError as e:
                    raise MaskFileError(f"{where}: {e}") from None
            rle = encode_segmentation(to_stored_frame(mask, orientation) if rule == "orient" else mask)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise MaskFileError(f"invalid RLE in {where}: {e}. Regenerate this mask file") from None
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else bytes(rle["counts"])
    return counts, int(rle["size"][0]), int(rle["size"][1])


class _Job:
    """What every worker needs; forked workers inherit it rather than receive it pickled."""

    def __init__(self, root: str, keys: list[str], source: MaskSource, coverage_ratio: float, parts_dir: str):
        self.root, self.keys, self.source = root, keys, source
        self.image_root = image_folder(root)  # root/train, or root for class folders directly inside
        self.coverage_ratio, self.parts_dir = coverage_ratio, parts_dir


_job: _Job | None = None


def _part_path(parts_dir: str, part: int) -> str:
    return os.path.join(parts_dir, f"part-{part:06d}.npz")


def _mask_stats(source: MaskSource, root: str, rels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, mtimes, ctimes) of the images' mask index files."""
    stats = np.zeros((3, len(rels)), np.int64)
    for i, rel in enumerate(rels):
        try:
            st = os.stat(source.index_file(rel))
        except OSError:
            raise MaskFileError(f"no masks for {os.path.join(image_folder(root), rel)}: {source.index_file(rel)} is "
                                f"missing") from None
        stats[:, i] = st.st_size, st.st_mtime_ns, st.st_ctime_ns
    return stats[0], stats[1], stats[2]


def _part_is_current(path: str, sizes: np.ndarray, mtimes: np.ndarray, ctimes: np.ndarray) -> bool:
    """A part left by an earlier, killed build counts if its mask files have not changed since
    (the same sizes and mtimes, no ctime after the part was written)."""
    try:
        with np.load(path) as part:
            return (np.array_equal(part["mask_bytes"], sizes) and np.array_equal(part["mask_mtime_ns"], mtimes)
                    and ctimes.max(initial=0) <= os.stat(path).st_mtime_ns)
    except Exception:  # noqa: BLE001 - unreadable: build it again
        return False


def _build_part(part: int) -> tuple[int, int, int, int, bool]:
    """Builds one part (or keeps a current one): (part, images, thresholded PNGs, unsorted tables, kept)."""
    job = _job
    rels = job.keys[part * PART_IMAGES:(part + 1) * PART_IMAGES]
    path = _part_path(job.parts_dir, part)
    sizes, mtimes, ctimes = _mask_stats(job.source, job.root, rels)
    if _part_is_current(path, sizes, mtimes, ctimes):
        return part, len(rels), 0, 0, True
    thresholded, unsorted = job.source.thresholded.value, job.source.unsorted.value
    length = np.full(len(rels), -1, np.int64)
    height, width = np.zeros(len(rels), np.int32), np.zeros(len(rels), np.int32)
    blobs = []
    for i, rel in enumerate(rels):
        entry = cache_entry(job.source, rel, job.coverage_ratio, os.path.join(job.image_root, rel))
        if entry is not None:
            blobs.append(entry[0])
            length[i], height[i], width[i] = len(entry[0]), entry[1], entry[2]
    with atomic_write(path) as f:
        np.savez(f, counts=np.frombuffer(b"".join(blobs), np.uint8), length=length, height=height, width=width,
                 mask_bytes=sizes, mask_mtime_ns=mtimes)
    return (part, len(rels), job.source.thresholded.value - thresholded, job.source.unsorted.value - unsorted, False)


class Progress:
    """One status line on stderr: a rewritten line on a terminal, a line every ``every`` s in a log."""

    def __init__(self, total: int, label: str, every: float = 30.0, stream=None):
        self.total, self.label, self.every = total, label, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.time()
        self.done = self.built = 0

    def update(self, images: int, built: bool) -> None:
        self.done += images
        self.built += images if built else 0
        now = time.time()
        if self.done == self.total or now - self.last >= (0.5 if self.tty else self.every):
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
            self.stream.flush()

    def line(self, now: float) -> str:
        rate = self.built / max(now - self.start, 1e-9)
        left = self.total - self.done
        eta = "-" if self.built == 0 else (time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?")
        return (f"{self.label}: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.1f}%), "
                f"{rate:.0f} images/s, ETA {eta}")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _plan(keys: list[str], coverage_ratio: float, mask_format: str) -> dict:
    digest = hashlib.sha1("\0".join(keys).encode("utf-8", "surrogateescape")).hexdigest()
    return {"images": len(keys), "keys_sha1": digest, "coverage_ratio": coverage_ratio, "mask_format": mask_format,
            "part_images": PART_IMAGES}


def _open_parts_dir(parts_dir: str, plan: dict) -> int:
    """Keeps the parts of an interrupted build of the same plan; anything else is removed. Returns
    how many parts were kept."""
    plan_path = os.path.join(parts_dir, "plan.json")
    try:
        with open(plan_path) as f:
            same = json.load(f) == plan
    except (OSError, ValueError):
        same = False
    if not same and os.path.isdir(parts_dir):
        shutil.rmtree(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    remove_stale_temp_files(parts_dir)  # the lock of masks_cache/ is held: no live writer owns them
    if not same:
        atomic_write_json(plan_path, plan)
        return 0
    return sum(name.startswith("part-") for name in os.listdir(parts_dir))


def _join_parts(parts_dir: str, n_parts: int, keys: list[str], bin_path: str, index_path: str, coverage_ratio: float,
                mask_format: str, folders: dict[str, np.ndarray]) -> None:
    arrays = {k: [] for k in ("length", "height", "width", "mask_bytes", "mask_mtime_ns")}
    with atomic_write(bin_path) as out:
        for part in range(n_parts):
            with np.load(_part_path(parts_dir, part)) as p:
                out.write(p["counts"].tobytes())
                for k in arrays:
                    arrays[k].append(p[k])
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in arrays.items()}
    length = joined["length"].astype(np.int64)
    offset = np.concatenate([[0], np.cumsum(np.maximum(length, 0))[:-1]]).astype(np.int64) if len(keys) else length
    with atomic_write(index_path) as f:  # written last: the cache counts as present only now
        np.savez(f, keys=np.array(keys), offset=offset, length=length, height=joined["height"].astype(np.int32),
                 width=joined["width"].astype(np.int32), coverage_ratio=np.float64(coverage_ratio),
                 mask_bytes=joined["mask_bytes"], mask_mtime_ns=joined["mask_mtime_ns"], mask_format=np.array(mask_format),
                 frame=np.array(STORED), **folders)


def build_mask_cache(root: str, image_rel_paths: list[str], coverage_ratio: float, mask_format: str = "auto",
                     workers: int = 1, progress_every: float = 30.0) -> str:
    """Writes the cache for these images (their masks must exist; images listed in the original's
    emptyfiles.txt are left out) with ``workers`` processes; returns the .bin path. Every entry is
    checked as training checks it, and records its mask index file's size and mtime, so a cache
    older than its masks is refused. A build that was killed resumes from its finished parts."""
    global _job
    bin_path, index_path = mask_cache_paths(root, coverage_ratio)
    cache_dir = os.path.dirname(bin_path)
    writable_dir(cache_dir, "mask cache folder")
    # one builder per folder; with the lock held, temporary files of killed builders are removed
    lock_output_dir(cache_dir)
    try:
        listed_empty = read_empty_list(root)
        keys = sorted(r for r in image_rel_paths if os.path.basename(r) not in listed_empty)
        check_unique_stems(keys, image_folder(root))
        source = open_mask_source(os.path.join(root, "masks"), {stem_of(k) for k in keys}, mask_format,
                                  shared_counters=False)
        parts_dir = os.path.splitext(bin_path)[0] + ".parts"
        kept = _open_parts_dir(parts_dir, _plan(keys, coverage_ratio, source.format))
        n_parts = -(-len(keys) // PART_IMAGES)
        if kept:
            print(f"resuming the mask cache build in {parts_dir}: {kept} of {n_parts} parts were built before")
        folders = mask_folders(source, keys)  # before the parts stat their files
        _job = _Job(root, keys, source, coverage_ratio, parts_dir)
        progress = Progress(len(keys), f"mask cache {os.path.basename(bin_path)}", progress_every)
        thresholded = unsorted = 0
        workers = max(1, min(workers, n_parts))
        pool = None
        try:
            if workers == 1:
                results = map(_build_part, range(n_parts))
            else:  # fork: the workers inherit _job (key list, mask reader) instead of unpickling it; each
                # freezes what it inherited at once, so that its collections never copy the parent's heap.
                # An executor, not a Pool: stopping a Pool whose idle workers wait on its task queue can
                # hang in terminate(); here a failure cancels the parts not started, and the parts being
                # built finish (each is written atomically)
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                           initializer=gc.freeze)
                results = (f.result() for f in as_completed([pool.submit(_build_part, i) for i in range(n_parts)]))
            for _, images, t, u, was_kept in results:
                thresholded, unsorted = thresholded + t, unsorted + u
                progress.update(images, not was_kept)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                remove_stale_temp_files(parts_dir)  # a worker killed mid-write (OOM, SIGKILL)
            _job = None
            progress.close()
        if thresholded or unsorted:
            print(f"{thresholded} mask PNG(s) were not strictly 0/255 and were thresholded at 128; "
                  f"{unsorted} table.txt file(s) were not sorted by coverage and were sorted first")
        _join_parts(parts_dir, n_parts, keys, bin_path, index_path, coverage_ratio, source.format, folders)
        shutil.rmtree(parts_dir)
    finally:
        unlock_output_dir(cache_dir)
    return bin_path
