"""Pretraining from tar shards (the webdataset format): for clusters whose file systems choke on
millions of small files, and for SA-1B's own tars, which train as they are.

A shard is a tar file; a sample is the members that share a key (the name up to its first dot):
its image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...), optionally its SAM masks (``.json``, any
form sam/files.py reads: SA-1B's {"image", "annotations"} or a bare list) and its class
(``.cls``, an integer; 0 when absent, as for SA-1B, and when it is not a number: pretraining does
not use it). This module reads the tars member by member and groups them as webdataset does (a
truncated tar, a key holding one suffix twice: one line naming the shard), and decides which
samples each rank and worker reads.

Every epoch, the shards are put in an order drawn from (seed, epoch) and the samples of that order
are dealt out as contiguous ranges: rank r reads the r-th range of len(dataset) samples, and its
loader workers split that range by whole batches. So every sample is read once per epoch by one
worker of one rank, except the at most world_size x batch_size - 1 left over at the end of the
order (other ones each epoch), every rank yields the same number of batches, and a worker enters
at most one shard in the middle. Within a worker, a buffer of --shuffle_buffer samples shuffles
across its shards. Augmentations are seeded per sample by its position in the epoch's order, so an
epoch is the same after a resume at an epoch boundary (with the same ranks, workers and batch).

Which tars a path names and how many samples each holds: a folder with the ``shards.json`` that
tools/write_shards.py writes beside its shards is read by that list only (other tars there are
named and left out), with the sample counts it records; every name it holds must be a file of that
folder, every count a whole number >= 0. For tars without one (SA-1B), the counts come from one
pass over the tar headers at the first start, saved as ``.segmae_shard_counts.json`` beside them
(or in the user's cache when that folder is read-only) and read again while each tar keeps its size
and change time (ctime: ``touch -d`` cannot set it back); a saved file naming anything but a file of
its folder is counted again.

A member is read only when its header's size is within MAX_MEMBER_BYTES (100 MB; the environment
variable SEGMAE_MAX_SHARD_MEMBER_MB changes it): a crafted header (a GNU sparse member "holding"
64 GB in 10 KB) makes its sample a bad sample, named, instead of an allocation of that size.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import tarfile
import zlib
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from inputs.images import DataError, EncodedImage, image_orientation, load_rgb
from inputs.pretrain import BadSample, sample_generator
from run.files import atomic_write_json
from sam.files import DISPLAYED, MaskFileError, parse_mask_json
from sam.geometry import IMAGE_ERRORS, exif_orientation, fit_mask
from sam.layouts import ClosestSegment, Counter, is_unsorted, json_segments
from util.misc import UserError

SHARD_INDEX = "shards.json"  # written by tools/write_shards.py: the shards, their sample counts, the classes
COUNTS_FILE = ".segmae_shard_counts.json"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
MAX_MEMBER_VARIABLE = "SEGMAE_MAX_SHARD_MEMBER_MB"
DEFAULT_MAX_MEMBER_MB = 100
REWRITE = "rewrite the folder with tools/write_shards.py"


def is_shard_path(path: str) -> bool:
    """A data path that names shards: a .tar file, a brace pattern (``train-{000..099}.tar``), a
    glob, or a folder of .tar files (or with a shards.json) without a train/ folder."""
    if path.endswith(".tar") or "{" in path or "*" in path:
        return True
    return (os.path.isdir(path) and not os.path.isdir(os.path.join(path, "train"))
            and (os.path.isfile(os.path.join(path, SHARD_INDEX)) or bool(glob.glob(os.path.join(path, "*.tar")))))


def expand_shards(path: str) -> list[str]:
    """The tar files a shard path names, sorted; a folder with a shards.json: the shards it lists."""
    if "{" in path:
        import braceexpand
        paths = list(braceexpand.braceexpand(path))
    elif "*" in path:
        paths = glob.glob(path)
    elif os.path.isdir(path):
        index = read_shard_index(path)
        tars = glob.glob(os.path.join(path, "*.tar"))
        if index is None:
            paths = tars
        else:
            paths = [os.path.join(path, entry["name"]) for entry in index["shards"]]
            unlisted = sorted(set(map(os.path.basename, tars)) - {entry["name"] for entry in index["shards"]})
            if unlisted:
                print(f"NOTE: {len(unlisted)} .tar file(s) in {path} are not listed in its {SHARD_INDEX} and are not "
                      f"read, e.g. {unlisted[0]} (left by an older write into this folder?)")
    else:
        paths = [path]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise UserError(f"--data_path {path}: {len(missing)} of {len(paths)} shard(s) do not exist, e.g. "
                        f"{(missing or [path])[0]}. Pass a folder of .tar files, a .tar file or a pattern like "
                        f"/data/shards/train-{{000000..000099}}.tar")
    return sorted(paths)


def is_plain_name(name) -> bool:
    """A file name of the folder itself: one path component, not '.' or '..' (what a shard index
    or a counts file may name; anything else could lead outside the data folder)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and os.path.basename(name) == name and (os.altsep is None or os.altsep not in name))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_shard_index(folder: str, writing: bool = False) -> dict | None:
    """The folder's shards.json, checked (None when there is none): ``shards``, a list of
    {"name": a file of this folder, "samples": a whole number >= 0}, names once each; ``classes``.
    Anything else is a DataError naming the file, the entry and the fix. An index a writer left
    unfinished is refused too, unless ``writing`` (the writer itself reads which files are its own)."""
    path = os.path.join(folder, SHARD_INDEX)
    if not os.path.isfile(path):
        return None
    fix = f"{REWRITE}, or delete {path} to read every .tar file in the folder"
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"cannot read the shard index {path} ({str(e)[:100]}): {fix}") from None
    if not isinstance(index, dict):
        raise DataError(f"{path} is not a shard index (a JSON object with a 'shards' list): {fix}")
    if index.get("incomplete") and not writing:
        raise DataError(f"{path} says a tools/write_shards.py run into {folder} did not finish (killed?): its shards "
                        f"are not all written. Run the same command again")
    entries = index.get("writing" if index.get("incomplete") else "shards", [])
    if not isinstance(entries, list):
        raise DataError(f"{path}: its 'shards' is not a list: {fix}")
    if index.get("incomplete"):
        entries = [{"name": name, "samples": 0} for name in entries]
    seen: set[str] = set()
    for n, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not is_plain_name(name):
            raise DataError(f"{path}: shard entry {n} names {str(name)[:80]!r}, which is not a file of {folder} "
                            f"(an index names its own folder's files only): {fix}")
        if not _is_count(entry.get("samples")):
            raise DataError(f"{path}: shard {name} has {str(entry.get('samples'))[:40]!r} samples, not a whole number "
                            f">= 0: {fix}")
        if name in seen:
            raise DataError(f"{path} lists shard {name} twice: {fix}")
        seen.add(name)
    classes = index.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: its 'classes' is not a list of names: {fix}")
    return {"shards": entries, "classes": classes}


def _key_and_suffix(name: str) -> tuple[str | None, str]:
    """(key, suffix) of a member: its path up to the first dot of its file name, and the rest
    (lower case); (None, "") for a name without a dot or starting with one (not a sample's member)."""
    base = os.path.basename(name)
    if "." not in base or base.startswith("."):
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


def _read_saved_counts(path: str) -> dict[str, list[int]]:
    """A saved counts file, {name: [size, ctime_ns, samples]}; one naming anything but a file of its
    folder, or holding anything else, counts for nothing (its tars are counted again)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    for name, record in data.items():
        if not (is_plain_name(name) and isinstance(record, list) and len(record) == 3
                and all(_is_count(v) for v in record)):
            print(f"NOTE: {path} holds an entry that is not a shard count of its folder ({str(name)[:60]!r}): "
                  f"the shards are counted again and the file rewritten")
            return {}
    return data


def shard_counts(paths: list[str]) -> tuple[list[int], list[str]]:
    """(samples per shard, class names or []) from shards.json, else from the saved header counts,
    else by counting (and saving the counts)."""
    counts: dict[str, int] = {}
    classes: list[str] = []
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        index = read_shard_index(folder) or {"shards": [], "classes": []}
        for entry in index["shards"]:
            counts[os.path.join(folder, entry["name"])] = entry["samples"]
        classes = classes or list(index["classes"])
        saved: dict[str, list[int]] = {}
        for candidate in _counts_paths(folder):
            saved.update(_read_saved_counts(candidate))
        fresh = {}
        for p in paths:
            ap = os.path.abspath(p)
            if os.path.dirname(ap) != folder or ap in counts:
                continue
            st = os.stat(ap)
            name = os.path.basename(ap)
            known = saved.get(name)
            # ctime, not mtime: a tar rewritten and then dated back with touch -d still changes its ctime
            if known and known[:2] == [st.st_size, st.st_ctime_ns]:
                counts[ap] = int(known[2])
            else:
                counts[ap] = count_samples(ap)
                fresh[name] = [st.st_size, st.st_ctime_ns, counts[ap]]
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
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (``__key__`` ...), not samples' files


def max_member_bytes() -> int:
    """The largest member a shard may hold, from SEGMAE_MAX_SHARD_MEMBER_MB (default 100 MB)."""
    text = os.environ.get(MAX_MEMBER_VARIABLE, "")
    try:
        mb = float(text) if text else DEFAULT_MAX_MEMBER_MB
        if not mb > 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{MAX_MEMBER_VARIABLE}={text!r} is not a size in MB above 0") from None
    return int(mb * 1_000_000)


class OversizedMember:
    """A member whose header claims more than the limit: left unread, its sample is a bad sample."""

    def __init__(self, name: str, size: int, limit: int):
        self.name, self.size, self.limit = name, size, limit

    def error(self, shard: str) -> DataError:
        return DataError(f"{shard}: member {self.name} claims {self.size:,} bytes, over the {self.limit:,} a shard "
                         f"member may hold (a damaged or crafted tar, e.g. a sparse member): not read. Rewrite the "
                         f"shard, or raise the limit with {MAX_MEMBER_VARIABLE}=<MB> if it is a real image")


def shard_members(shard: str, limit: int) -> Iterator[tuple[str, str, bytes | OversizedMember]]:
    """(key, suffix, data) of every regular file of a shard, in order, read one at a time; a member
    whose header claims more than ``limit`` bytes is not read (an OversizedMember instead). A tar
    that ends early or is damaged is a DataError naming it."""
    name = "its first member"
    try:
        with open(shard, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # a stream's headers are not needed again
                name = member.name
                key, suffix = _key_and_suffix(member.name)
                if not member.isreg() or key is None or _META_MEMBER.match(member.name):
                    continue
                if member.size > limit:
                    yield key, suffix, OversizedMember(member.name, member.size, limit)
                    continue
                yield key, suffix, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read shard {shard} at {name} ({e}): the file is truncated or damaged: {REWRITE}, "
                        f"or copy the shard again") from None


def shard_samples(shard: str, limit: int) -> Iterator[dict]:
    """A shard's samples: its members grouped by key (consecutive members sharing the name up to
    the first dot), as webdataset groups them: {"__key__", "__url__", suffix: data, ...}. A key
    holding the same suffix twice is a DataError naming the member."""
    sample: dict | None = None
    for key, suffix, data in shard_members(shard, limit):
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": shard}
        if suffix in sample:
            raise DataError(f"{shard}: {key}.{suffix} appears twice in a row (a duplicate key), but a sample holds "
                            f"one file of each kind: {REWRITE}, which numbers the samples")
        sample[suffix] = data
    if sample is not None:
        yield sample


_noted_classes: set[str] = set()  # shards whose unreadable .cls this process already noted


def sample_class(sample: dict, where: str) -> int:
    """The sample's class from its .cls member (0 without one, as SA-1B); one that is not a whole
    number is read as 0 with a note, once per shard and process: pretraining does not use the class."""
    raw = sample.get("cls")
    if raw is None:
        return 0
    try:
        return int(raw.decode("ascii").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        if sample["__url__"] not in _noted_classes:
            _noted_classes.add(sample["__url__"])
            shown = f"{raw.size:,} bytes" if isinstance(raw, OversizedMember) else repr(raw[:20])
            print(f"NOTE: {where}.cls holds {shown}, not a class index: read as class 0 (pretraining does not "
                  f"use the class; other such samples of {os.path.basename(sample['__url__'])} are not reported)")
        return 0


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
        self.max_member_bytes = max_member_bytes()
        self.total = int(self.counts.sum())
        self.batches_per_rank = self.total // (world_size * batch_size)
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared with forked persistent workers
        self.rotated = multiprocessing.Value("q", 0)
        self.oriented = multiprocessing.Value("q", 0)  # reads of images with an EXIF orientation other than 1
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
        for shard, skip, take, first in plan:
            seen = 0
            for sample in shard_samples(shard, self.max_member_bytes):
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
        if isinstance(data, OversizedMember):
            raise data.error(sample["__url__"])
        img = load_rgb(f"{where}.{suffix}", data) if self.decode else EncodedImage(f"{where}.{suffix}", data)
        if image_orientation(img) != 1:
            with self.oriented.get_lock():
                self.oriented.value += 1
        label = sample_class(sample, where)
        if not self.with_masks:
            return img, None, label
        if "json" not in sample:
            raise MaskFileError(f"{where} has no masks (.json member): this mask method needs SAM masks in each "
                                f"sample; write the shards with tools/write_shards.py from a tree with masks/")
        if isinstance(sample["json"], OversizedMember):
            raise sample["json"].error(sample["__url__"])
        mask_where = f"{where}.json"
        parsed = parse_mask_json(sample["json"], mask_where)
        segments = json_segments(parsed.annotations, parsed.choice, mask_where, parsed.frame)
        if segments.ties == "larger" and is_unsorted(segments.coverages):
            self.unsorted.add()
        mask = self.segment_choice.hidden_segment(segments, img.size, generator)
        if mask.shape != (img.height, img.width) or segments.frame == DISPLAYED:  # sam/geometry.py's policy
            try:
                orientation = exif_orientation(io.BytesIO(data))
            except IMAGE_ERRORS:
                orientation = 1
            mask, rule = fit_mask(mask, img.size, orientation, mask_where, segments.frame)
            if rule == "orient":
                with self.rotated.get_lock():
                    self.rotated.value += 1
        return img, mask, label

    def preview(self, n: int) -> tuple[list, list[str]]:
        """The first n samples of the first shard, augmented as in epoch 0, and their keys."""
        plan = [(self.shards[0], 0, min(n, int(self.counts[0])), 0)]
        samples = list(self._samples(plan))
        return [self.prepare(s, p, 0) for p, s in samples], [s["__key__"] for _, s in samples]

    def mask_notes(self) -> dict[str, int]:
        return {"oriented": int(self.oriented.value), "rotated": int(self.rotated.value), "thresholded": 0,
                "unsorted": self.unsorted.value}

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

