"""Pretraining from tar shards (the webdataset format): for clusters whose file systems choke on
millions of small files, and for SA-1B's own tars, which train as they are.

A shard is a tar file; a sample is the members that share a key (the name up to its first dot):
its image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...), optionally its SAM masks (``.json``, any
form util/sam_masks.py reads: SA-1B's {"image", "annotations"} or a bare list) and its class
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

Which tars a path names and how many samples each holds: util/shard_index.py.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from util.errors import UserError
from util.images import IMAGE_ERRORS, EncodedImage, load_rgb
from util.mask_sources import JsonMasks, segment_mask
from util.mask_geometry import exif_orientation, fit_mask
from util.sam_masks import MaskFileError, parse_mask_json
from util.shard_index import COUNTS_FILE, IMAGE_SUFFIXES, SHARD_INDEX, expand_shards, shard_counts

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
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, skip_bad_samples: bool = False, decode: bool = True):
        import multiprocessing
        self.shards, self.counts = list(shards), np.asarray(counts, np.int64)
        self.transform, self.with_masks, self.coverage_ratio = transform, with_masks, coverage_ratio
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.shuffle_buffer, self.skip_bad_samples, self.decode = shuffle_buffer, skip_bad_samples, decode
        self.total = int(self.counts.sum())
        self.batches_per_rank = self.total // (world_size * batch_size)
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared with forked persistent workers
        self.rotated = multiprocessing.Value("q", 0)
        self.masks = JsonMasks("", shared_counters=True)  # the segment choice of masks/<...>.json files

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
        from util.datasets import BadSample, sample_generator
        where = f"{sample['__url__']}:{sample['__key__']}"
        try:
            img, mask, label = self.read(sample, where)
        except UserError as e:
            if not self.skip_bad_samples:
                raise
            return BadSample(str(e))
        generator = sample_generator(self.seed, epoch, position)
        if mask is None:
            return self.transform(img, generator=generator), label
        img_t, mask_t = self.transform(img, mask, generator=generator)
        return img_t, mask_t, label

    def read(self, sample: dict, where: str):
        """(image, mask or None, class) of one sample as stored."""
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
        seg = self.masks.choose_in(*parse_mask_json(sample["json"], mask_where), mask_where, self.coverage_ratio)
        mask = segment_mask(seg, img.size)
        if mask.shape != (img.height, img.width):  # the size policy of util/mask_geometry.py
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
        return {"rotated": int(self.rotated.value), "thresholded": 0, "unsorted": self.masks.unsorted.value}

    def digest(self) -> str:
        """Identifies the shard set (names and counts) for the ranks-agree check."""
        text = "\0".join(f"{os.path.basename(s)}:{c}" for s, c in zip(self.shards, self.counts.tolist()))
        return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()

    def __repr__(self) -> str:
        return (f"ShardDataset({self.total} samples in {len(self.shards)} shard(s), {len(self)} per rank per epoch, "
                f"masks={self.with_masks}, transform={self.transform})")


def build_shard_dataset(data_paths: list[str], transform: Callable, with_masks: bool, coverage_ratio: float,
                        batch_size: int, world_size: int, rank: int, seed: int, shuffle_buffer: int,
                        skip_bad_samples: bool, decode: bool) -> ShardDataset:
    shards = [s for path in data_paths for s in expand_shards(path)]
    counts, _ = shard_counts(shards)
    dataset = ShardDataset(shards, counts, transform, with_masks, coverage_ratio, batch_size, world_size, rank, seed,
                           shuffle_buffer, skip_bad_samples, decode)
    if dataset.batches_per_rank == 0:
        raise UserError(f"only {dataset.total} samples in {len(shards)} shard(s) for a global batch of "
                        f"{batch_size * world_size}: lower --batch_size")
    return dataset

