"""What every mask layout implements: a segment, the reader of one root's masks (``MaskSource``),
and the counts its data-loader workers share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from util.mask_sources.walk import scan
from util.mask_geometry import check_mask_not_huge
from util.sam_masks import MaskFileError, closest_first

@dataclass
class Segment:
    """One segment of an image: its coverage (percent of the mask's pixels), its size (H, W) when
    known without decoding, and how to decode it to an (H, W) uint8 array of 0/1."""
    coverage: float
    size: tuple[int, int] | None
    decode: Callable[[], np.ndarray]
    where: str
    fields: dict = field(default_factory=dict)  # the rest of SAM's annotation (bbox, predicted_iou, ...)
    rle: dict | None = None  # the COCO RLE as stored, for layouts that store one (json)


class Counter:
    """A count shared by the data-loader workers (fork-shared memory) or a plain int."""

    def __init__(self, shared: bool = True):
        if shared:
            import multiprocessing
            self._value = multiprocessing.Value("q", 0)
        else:
            self._value = None
            self._plain = 0

    def add(self, n: int = 1) -> None:
        if self._value is None:
            self._plain += n
            return
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return self._plain if self._value is None else int(self._value.value)

    def reset(self, value: int) -> None:
        if self._value is None:
            self._plain = value
        else:
            with self._value.get_lock():
                self._value.value = value


class MaskSource:
    """The masks of one root in one layout. ``rel`` is an image's path relative to train/."""

    format = ""
    listing = ""  # the scan listing (json or folders) that holds this layout's images

    def __init__(self, mask_root: str, shared_counters: bool = True):
        self.mask_root = mask_root
        self.thresholded = Counter(shared_counters)  # PNGs that were not strictly 0/255
        self.unsorted = Counter(shared_counters)  # segmae tables not sorted by coverage
        self.listed: set[str] | None = None  # the stems with masks, when a scan already listed them

    def location(self, rel: str) -> str:
        """The file or folder holding the masks of image rel."""
        raise NotImplementedError

    def index_file(self, rel: str) -> str:
        """The file whose size and mtime change when the image's masks change (cache staleness)."""
        return self.location(rel)

    def segments(self, rel: str) -> list[Segment]:
        """Every segment of image rel, in the file's order; no mask is decoded."""
        raise NotImplementedError

    def choose(self, segments: list[Segment], coverage_ratio: float) -> Segment | None:
        """The segment closest to coverage_ratio percent; ties go to the first."""
        i = closest_first([s.coverage for s in segments], coverage_ratio)
        return None if i is None else segments[i]

    def chosen(self, rel: str, coverage_ratio: float) -> Segment | None:
        return self.choose(self.segments(rel), coverage_ratio)

    def load(self, rel: str, coverage_ratio: float, image_size: tuple[int, int]) -> np.ndarray:
        """The chosen segment as an (H, W) uint8 array, 1 = hidden; all zero when the image has no
        segment (``image_size`` is (W, H))."""
        return segment_mask(self.chosen(rel, coverage_ratio), image_size)

    def present(self, stems: set[str]) -> set[str]:
        """Which of these image stems (rel without extension, normalised) have masks: one listing
        per folder of masks/, never one per image."""
        if self.listed is None:
            self.listed = scan(self.mask_root, stems)[0][self.listing]
        return self.listed & stems

    def generator(self, rel: str) -> str:
        """What made image rel's masks, in words (for pictures and reports)."""
        return "SAM"


def segment_mask(seg: Segment | None, image_size: tuple[int, int]) -> np.ndarray:
    """A chosen segment as an (H, W) uint8 array, 1 = hidden; all zero for None (no segment)."""
    if seg is None:
        w, h = image_size
        return np.zeros((h, w), dtype=np.uint8)
    if seg.size is not None:  # before decoding: a crafted size would allocate gigabytes
        try:
            check_mask_not_huge(seg.size, image_size)
        except ValueError as e:
            raise MaskFileError(f"{seg.where}: {e}. Regenerate its masks from the image") from None
    return seg.decode()
