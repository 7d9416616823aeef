"""Pretraining from tar shards (the webdataset format): for clusters whose file systems choke on
millions of small files, and for SA-1B's own tars, which train as they are.

A shard is a tar file; a sample is the members that share a key (the name up to its first dot):
its image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...), optionally its SAM masks (``.json``, any
form sam/files.py reads: SA-1B's {"image", "annotations"} or a bare list) and its class
(``.cls``, an integer; 0 when absent, as for SA-1B). webdataset reads the tars and groups their
members; this module decides which samples each rank and worker reads.

Every epoch, the shards are put in an order drawn from (seed, epoch) and the samples of that order
are dealt out as contiguous ranges: rank r reads the r-th range of len(dataset) samples, and its
loader workers split that range by whole batches. So every sample is read once per epoch by one
worker of one rank, except the at most world_size x batch_size - 1 left over at the end of the
order (other ones each epoch), every rank yields the same number of batches, and a worker enters
at most one shard in the middle. Within a worker, a buffer of --shuffle_buffer samples shuffles
across its shards. Augmentations are seeded per sample by its position in the epoch's order, so an
epoch is the same after a resume at an epoch boundary (with the same ranks, workers and batch).

Which tars a path names and how many samples each holds: sample counts come from the
``shards.json`` that tools/write_shards.py writes beside the shards; for tars without one (SA-1B),
from one pass over the tar headers at the first start, saved as ``.segmae_shard_counts.json``
beside them (or in the user's cache when that folder is read-only) and read again while each tar
keeps its size and modification time.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import multiprocessing
import os
import random
import tarfile
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from inputs.images import EncodedImage, load_rgb
from inputs.pretrain import BadSample, sample_generator
from run.files import atomic_write_json
from sam.files import MaskFileError, parse_mask_json
from sam.geometry import IMAGE_ERRORS, exif_orientation, fit_mask
from sam.layouts import ClosestSegment, Counter, is_unsorted, json_segments
from util.misc import UserError

SHARD_INDEX = "shards.json"  # written by tools/write_shards.py: the shards, their sample counts, the classes
COUNTS_FILE = ".segmae_shard_counts.json"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def is_shard_path(path: str) -> bool:
    """A data path that names shards: a .tar file, a brace pattern (``train-{000..099}.tar``), a
    glob, or a folder of .tar files without a train/ folder."""
    if path.endswith(".tar") or "{" in path or "*" in path:
        return True
    return (os.path.isdir(path) and not os.path.isdir(os.path.join(path, "train"))
            and bool(glob.glob(os.path.join(path, "*.tar"))))


def expand_shards(path: str) -> list[str]:
    """The tar files a shard path names, sorted."""
    if "{" in path:
        import braceexpand
        paths = list(braceexpand.braceexpand(path))
    elif "*" in path:
        paths = glob.glob(path)
    elif os.path.isdir(path):
        paths = glob.glob(os.path.join(path, "*.tar"))
    else:
        paths = [path]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise UserError(f"--data_path {path}: {len(missing)} of {len(paths)} shard(s) do not exist, e.g. "
                        f"{(missing or [path])[0]}. Pass a folder of .tar files, a .tar file or a pattern like "
                        f"/data/shards/train-{{000000..000099}}.tar")
    return sorted(paths)


def _key_and_suffix(name: str) -> tuple[str | None, str]:
    base = os.path.basename(name)
    if "." not in base:
        return None, ""
    stem, suffix = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), suffix.lower()


def count_samples(tar_path: str) -> int:
    """Samples (keys with an image) in one tar, from its headers: the data is seeked over."""
    keys = set()
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                key, suffix = _key_and_suffix(member.name)
                if member.isfile() and key is not None and suffix in IMAGE_SUFFIXES:
                    keys.add(key)
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"cannot read shard {tar_path}: {e}. Rewrite or remove it") from None
    return len(keys)


def _counts_paths(folder: str) -> list[str]:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(os.path.realpath(folder).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [os.path.join(folder, COUNTS_FILE), os.path.join(cache, "segmae", "shards", f"{digest}.json")]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def shard_counts(paths: list[str]) -> tuple[list[int], list[str]]:
    """(samples per shard, class names or []) from shards.json, else from the saved header counts,
    else by counting (and saving the counts)."""
    counts: dict[str, int] = {}
    classes: list[str] = []
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        index = _read_json(os.path.join(folder, SHARD_INDEX))
        for entry in index.get("shards", []):
            counts[os.path.join(folder, entry["name"])] = int(entry["samples"])
        classes = classes or list(index.get("classes", []))
        saved = {}
        for candidate in _counts_paths(folder):
            saved.update(_read_json(candidate))
        fresh = {}
        for p in paths:
            ap = os.path.abspath(p)
            if os.path.dirname(ap) != folder or ap in counts:
                continue
            st = os.stat(ap)
            name = os.path.basename(ap)
            known = saved.get(name)
            if known and known[:2] == [st.st_size, st.st_mtime_ns]:
                counts[ap] = int(known[2])
            else:
                counts[ap] = count_samples(ap)
                fresh[name] = [st.st_size, st.st_mtime_ns, counts[ap]]
        if fresh:
            _save_counts(folder, {**saved, **fresh})
    return [counts[os.path.abspath(p)] for p in paths], classes


def _save_counts(folder: str, counts: dict) -> None:
    for candidate in _counts_paths(folder):
        try:
            os.makedirs(os.path.dirname(candidate), exist_ok=True)
            atomic_write_json(candidate, counts)
            return
        except OSError:
            continue  # a read-only data folder: the user's cache


# ------------------------------------------------------------------------------------------------
# reading the samples

DEFAULT_SHUFFLE_BUFFER = 2000


def worker_ranges(order_counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The samples [start, stop) of shards laid end to end in this order, as (position in the
    order, samples to skip in that shard, samples to take from it)."""
    ranges, first = [], 0
    for position, n in enumerate(order_counts):
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            ranges.append((position, lo - first, hi - lo))
        first += n
        if first >= stop:
            break
    return ranges


class ShardDataset(IterableDataset):
    """Augmented pretraining samples from tar shards, like PretrainDataset's: (image, mask, class)
    with masks, else (image, class). ``len`` is this rank's samples per epoch, a whole number of
    batches. Call ``set_epoch`` before iterating an epoch (persistent workers see it)."""

    def __init__(self, shards: list[str], counts: list[int], transform: Callable, with_masks: bool,
                 coverage_ratio: float, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, skip_bad_samples: bool = False, decode: bool = True,
                 segment_choice=None):
        self.shards, self.counts = list(shards), np.asarray(counts, np.int64)
        self.transform, self.with_masks = transform, with_masks
        # which of a sample's segments is hidden: the mask method, by default the closest to the coverage
        self.segment_choice = segment_choice if segment_choice is not None else ClosestSegment(coverage_ratio)
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.shuffle_buffer, self.skip_bad_samples, self.decode = shuffle_buffer, skip_bad_samples, decode
        self.total = int(self.counts.sum())
        self.batches_per_rank = self.total // (world_size * batch_size)
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared with forked persistent workers
        self.rotated = multiprocessing.Value("q", 0)
        self.unsorted = Counter()  # mask files converted from segmae tables that were not sorted

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the shards."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def plan(self, epoch: int, worker: int, num_workers: int) -> list[tuple[str, int, int, int]]:
        """What one worker of this rank reads in an epoch: (shard, skip, take, epoch position of
        its first sample taken)."""
        order = self.order(epoch)
        counts = self.counts[order].tolist()
        per_worker = [self.batches_per_rank // num_workers + (w < self.batches_per_rank % num_workers)
                      for w in range(num_workers)]
        start = (self.rank * self.batches_per_rank + sum(per_worker[:worker])) * self.batch_size
        stop = start + per_worker[worker] * self.batch_size
        offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        return [(self.shards[order[pos]], skip, take, offsets[pos] + skip)
                for pos, skip, take in worker_ranges(counts, start, stop)]

    def _samples(self, plan: list[tuple[str, int, int, int]]) -> Iterator[tuple[int, dict]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander
        for shard, skip, take, first in plan:
            with open(shard, "rb") as stream:
                members = tar_file_expander([{"url": shard, "stream": stream}])
                seen = 0
                for sample in group_by_keys(members):
                    if not any(s in sample for s in IMAGE_SUFFIXES):
                        continue  # a key without an image (e.g. a stray metadata file)
                    if seen >= skip:
                        yield first + seen - skip, sample
                    seen += 1
                    if seen == skip + take:
                        break
            if seen < skip + take:
                raise UserError(f"shard {shard} holds {seen} samples, but its count says {skip + take} or more: it "
                                f"changed since it was counted. Delete {os.path.dirname(shard)}/{COUNTS_FILE} (and "
                                f"rewrite its {SHARD_INDEX}) and start again")

    def __iter__(self):
        from webdataset.filters import shuffle
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        stream = self._samples(self.plan(epoch, worker, num_workers))
        if self.shuffle_buffer > 1:
            rng = random.Random(((self.seed * 1_000_003 + epoch) * 10_007 + self.rank) * 1_009 + worker)
            stream = shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        for position, sample in stream:
            yield self.prepare(sample, position, epoch)

    def prepare(self, sample: dict, position: int, epoch: int):
        """One sample, read and augmented (a BadSample with --skip_bad_samples when unreadable)."""
        where = f"{sample['__url__']}:{sample['__key__']}"
        generator = sample_generator(self.seed, epoch, position)
        try:
            img, mask, label = self.read(sample, where, generator)
        except UserError as e:
            if not self.skip_bad_samples:
                raise
            return BadSample(str(e))
        if mask is None:
            return self.transform(img, generator=generator), label
        img_t, mask_t = self.transform(img, mask, generator=generator)
        return img_t, mask_t, label

    def read(self, sample: dict, where: str, generator=None):
        """(image, mask or None, class) of one sample as stored (``generator``: the sample's random
        numbers of this epoch, for the method's choice of segment)."""
        suffix = next(s for s in IMAGE_SUFFIXES if s in sample)
        data = sample[suffix]
        img = load_rgb(f"{where}.{suffix}", data) if self.decode else EncodedImage(f"{where}.{suffix}", data)
        label = int(sample["cls"]) if "cls" in sample else 0
        if not self.with_masks:
            return img, None, label
        if "json" not in sample:
            raise MaskFileError(f"{where} has no masks (.json member): this mask method needs SAM masks in each "
                                f"sample; write the shards with tools/write_shards.py from a tree with masks/")
        mask_where = f"{where}.json"
        segments = json_segments(*parse_mask_json(sample["json"], mask_where), mask_where)
        if segments.ties == "larger" and is_unsorted(segments.coverages):
            self.unsorted.add()
        mask = self.segment_choice.hidden_segment(segments, img.size, generator)
        if mask.shape != (img.height, img.width):  # the size policy of sam/geometry.py
            try:
                orientation = exif_orientation(io.BytesIO(data))
            except IMAGE_ERRORS:
                orientation = 1
            mask, rule = fit_mask(mask, img.size, orientation, mask_where)
            if rule == "rotate":
                with self.rotated.get_lock():
                    self.rotated.value += 1
        return img, mask, label

    def preview(self, n: int) -> tuple[list, list[str]]:
        """The first n samples of the first shard, augmented as in epoch 0, and their keys."""
        plan = [(self.shards[0], 0, min(n, int(self.counts[0])), 0)]
        samples = list(self._samples(plan))
        return [self.prepare(s, p, 0) for p, s in samples], [s["__key__"] for _, s in samples]

    def mask_notes(self) -> dict[str, int]:
        return {"rotated": int(self.rotated.value), "thresholded": 0, "unsorted": self.unsorted.value}

    def digest(self) -> str:
        """Identifies the shard set (names and counts) for the ranks-agree check."""
        text = "\0".join(f"{os.path.basename(s)}:{c}" for s, c in zip(self.shards, self.counts.tolist()))
        return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()

    def __repr__(self) -> str:
        return (f"ShardDataset({self.total} samples in {len(self.shards)} shard(s), {len(self)} per rank per epoch, "
                f"masks={self.with_masks}, transform={self.transform})")


def build_shard_dataset(data_paths: list[str], transform: Callable, with_masks: bool, coverage_ratio: float,
                        batch_size: int, world_size: int, rank: int, seed: int, shuffle_buffer: int,
                        skip_bad_samples: bool, decode: bool, segment_choice=None) -> ShardDataset:
    shards = [s for path in data_paths for s in expand_shards(path)]
    counts, _ = shard_counts(shards)
    dataset = ShardDataset(shards, counts, transform, with_masks, coverage_ratio, batch_size, world_size, rank, seed,
                           shuffle_buffer, skip_bad_samples, decode, segment_choice)
    if dataset.batches_per_rank == 0:
        raise UserError(f"only {dataset.total} samples in {len(shards)} shard(s) for a global batch of "
                        f"{batch_size * world_size}: lower --batch_size")
    return dataset

