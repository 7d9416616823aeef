"""Builds the compact mask cache (util/mask_cache.py) in parallel and resumably.

The images are cut into parts of PART_IMAGES; worker processes each build whole parts, written
atomically to <root>/masks_cache/coverage_<C>.parts/. A killed build, rerun, keeps every part whose
mask files are unchanged and builds only the rest; the finished parts are then joined into the
cache's .bin and .npz, and the parts folder is removed. Progress (images/s, ETA) goes to stderr.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

from util.files import atomic_write, atomic_write_json, lock_output_dir, remove_stale_temp_files, unlock_output_dir, writable_dir
from util.images import IMAGE_ERRORS, image_error
from util.image_roots import image_folder_of
from util.mask_cache import mask_cache_paths, mask_folders
from util.mask_sources import MaskSource, open_mask_source, read_empty_list, stem_of
from util.mask_geometry import exif_orientation, mask_fit
from util.sam_masks import MaskFileError, check_rle, check_unique_stems, decode_segmentation, encode_segmentation

PART_IMAGES = 2048  # images per part: what a killed build can lose, per worker


def cache_entry(source: MaskSource, rel: str, coverage_ratio: float, image_path: str) -> tuple[bytes, int, int] | None:
    """(RLE counts, H, W) of the image's chosen segment, checked as training checks it (valid
    RLE, the size policy against the image's header); None when it has no segment."""
    seg = source.chosen(rel, coverage_ratio)
    if seg is None:
        return None
    where = source.location(rel)
    try:
        with Image.open(image_path) as im:
            image_wh, orientation = im.size, exif_orientation(im)
    except IMAGE_ERRORS as e:
        raise MaskFileError(str(image_error(image_path, e))) from None
    if seg.size is not None:  # the size policy before anything is decoded
        try:
            mask_fit(seg.size, image_wh, orientation)
        except ValueError as e:
            raise MaskFileError(f"{where}: {e}") from None
    try:
        if seg.rle is not None and not isinstance(seg.rle["counts"], list):
            check_rle(seg.rle)
            rle = seg.rle
        else:  # a PNG, or an uncompressed RLE: stored compressed (decoding checks it)
            rle = encode_segmentation(seg.decode() if seg.rle is None else decode_segmentation(seg.rle))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise MaskFileError(f"invalid RLE in {where}: {e}. Regenerate this mask file") from None
    if seg.size is None:  # a PNG: its size is known now
        try:
            mask_fit(tuple(rle["size"]), image_wh, orientation)
        except ValueError as e:
            raise MaskFileError(f"{where}: {e}") from None
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else bytes(rle["counts"])
    return counts, int(rle["size"][0]), int(rle["size"][1])


class _Job:
    """What every worker needs; forked workers inherit it rather than receive it pickled."""

    def __init__(self, root: str, keys: list[str], source: MaskSource, coverage_ratio: float, parts_dir: str):
        self.root, self.keys, self.source = root, keys, source
        self.image_root = image_folder_of(root)[0]  # root/train, or root for class folders directly inside
        self.coverage_ratio, self.parts_dir = coverage_ratio, parts_dir


_job: _Job | None = None


def _part_path(parts_dir: str, part: int) -> str:
    return os.path.join(parts_dir, f"part-{part:06d}.npz")


def _mask_stats(source: MaskSource, root: str, rels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    sizes, mtimes = np.zeros(len(rels), np.int64), np.zeros(len(rels), np.int64)
    for i, rel in enumerate(rels):
        try:
            st = os.stat(source.index_file(rel))
        except OSError:
            raise MaskFileError(f"no masks for {os.path.join(image_folder_of(root)[0], rel)}: {source.index_file(rel)} is "
                                f"missing") from None
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _part_is_current(path: str, sizes: np.ndarray, mtimes: np.ndarray) -> bool:
    """A part left by an earlier, killed build counts if its mask files have not changed since."""
    try:
        with np.load(path) as part:
            return np.array_equal(part["mask_bytes"], sizes) and np.array_equal(part["mask_mtime_ns"], mtimes)
    except Exception:  # noqa: BLE001 - unreadable: build it again
        return False


def _build_part(part: int) -> tuple[int, int, int, int, bool]:
    """Builds one part (or keeps a current one): (part, images, thresholded PNGs, unsorted tables, kept)."""
    job = _job
    rels = job.keys[part * PART_IMAGES:(part + 1) * PART_IMAGES]
    path = _part_path(job.parts_dir, part)
    sizes, mtimes = _mask_stats(job.source, job.root, rels)
    if _part_is_current(path, sizes, mtimes):
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
                 **folders)


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
        check_unique_stems(keys, image_folder_of(root)[0])
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
        try:
            if workers == 1:
                results = map(_build_part, range(n_parts))
                pool = None
            else:  # fork: the workers inherit _job (key list, mask reader) instead of unpickling it
                pool = multiprocessing.get_context("fork").Pool(workers)
                results = pool.imap_unordered(_build_part, range(n_parts))
            for _, images, t, u, was_kept in results:
                thresholded, unsorted = thresholded + t, unsorted + u
                progress.update(images, not was_kept)
        finally:
            if pool is not None:
                pool.terminate()  # SIGTERM: a worker stopped mid-write leaves its temporary part
                pool.join()
                remove_stale_temp_files(parts_dir)
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
