"""Where a data root's SAM masks come from: one reader per layout on disk behind one interface.

    json    masks/<class>/<stem>.json               SAM's coco_rle output (SA-1B per-image form or a
                                                    bare list of annotations); ties go to the first
    segmae  masks/<class>/<stem>/table.txt + PNGs   the original segmae code: one line
                                                    "<coverage percent> <png name>" per segment, binary
                                                    'L' PNGs (255 = segment); ties go to the larger
                                                    coverage, above the largest: the largest
    amg     masks/<class>/<stem>/metadata.csv       segment-anything's scripts/amg.py default output:
            + 0.png, 1.png, ...                     row i describes i.png; coverage from its `area`

A reader hands over an image's ``ImageSegments``: every segment's coverage, read from the small
index (the JSON's areas, table.txt, metadata.csv's area column), and each segment built and
decoded only when asked. Which segment (or segments) hides what is the mask method's choice
(mask_methods.py); ``closest`` is the default rule, with the layout's own tie rule. The layout is detected per root
(``--mask_format`` forces one; sam/listing.py); a root mixing layouts is an error.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from sam.files import (DISPLAYED, MASK_SUFFIX, UNKNOWN, MaskFileError, annotation_coverages, closest_first,
                       decode_segmentation, load_mask_json, mask_size)
from sam.geometry import IMAGE_ERRORS, check_mask_not_huge
from sam.listing import AMG_HEADER, AMG_METADATA, MASK_FORMATS, SEGMAE_TABLE, _detect, scan


@dataclass
class Segment:
    """One segment of an image: its coverage (percent of the mask's pixels), its size (H, W) when
    known without decoding, how to decode it to an (H, W) uint8 array of 0/1, where it is stored,
    and the rest of SAM's annotation (``fields``: bbox, predicted_iou, ...; read when asked)."""
    coverage: float
    size: tuple[int, int] | None
    decode: Callable[[], np.ndarray]
    where: str
    read_fields: Callable[[], dict] = dict
    rle: dict | None = None  # the COCO RLE as stored, for layouts that store one (json)

    @property
    def fields(self) -> dict:
        return self.read_fields()


class ImageSegments:
    """One image's segments in file order: every coverage up front, each ``Segment`` built (and
    decoded) only when asked. ``ties`` is how the layout breaks a tie of coverage in ``closest``:
    'first' (SAM's layouts) or 'larger' (the original segmae code's). ``frame``: the picture the
    masks were made on (sam/files.py: stored, displayed or unknown; sam/geometry.py maps them)."""

    def __init__(self, coverages: list[float], make: Callable[[int], Segment], where: str, ties: str = "first",
                 frame: str = UNKNOWN):
        self.coverages, self._make, self.where, self.ties, self.frame = coverages, make, where, ties, frame

    def __len__(self) -> int:
        return len(self.coverages)

    def __getitem__(self, i: int) -> Segment:
        if not -len(self) <= i < len(self):
            raise IndexError(f"segment {i} of {len(self)}")
        return self._make(i % len(self))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def is_unsorted(coverages: list[float]) -> bool:
    return any(a > b for a, b in zip(coverages, coverages[1:]))


def closest_larger(coverages: list[float], coverage_ratio: float) -> tuple[int | None, bool]:
    """The original segmae code's choice, as an index into coverages: the closest coverage, equal
    distance to the larger one, above the largest the largest. The original assumes the table is
    sorted by coverage (as it writes them) and picks wrongly otherwise; an unsorted one is sorted
    here first (stable), and the second value says it was."""
    if not coverages:
        return None, False
    order = list(range(len(coverages)))
    unsorted = is_unsorted(coverages)
    if unsorted:
        order.sort(key=lambda i: coverages[i])
    ordered = [coverages[i] for i in order]
    if coverage_ratio >= ordered[-1]:
        return order[-1], unsorted
    above = bisect.bisect_left(ordered, coverage_ratio)  # the first coverage >= the ratio
    if above > 0 and abs(ordered[above - 1] - coverage_ratio) < abs(ordered[above] - coverage_ratio):
        above -= 1
    return order[above], unsorted


def closest(segments: ImageSegments, coverage_ratio: float) -> Segment | None:
    """The segment whose coverage is closest to coverage_ratio percent, ties broken by the
    layout's rule (None for an image without segments): the default choice of every SAM method,
    and what the compact cache stores."""
    if segments.ties == "larger":
        i = closest_larger(segments.coverages, coverage_ratio)[0]
    else:
        i = closest_first(segments.coverages, coverage_ratio)
    return None if i is None else segments[i]


class ClosestSegment:
    """The choice by coverage alone, where no mask method chooses (the tools, datasets built
    directly): the segment closest to ``coverage_ratio`` percent, which the compact cache holds."""

    def __init__(self, coverage_ratio: float):
        self.coverage_ratio = coverage_ratio

    def hidden_segment(self, segments: ImageSegments, image_size: tuple[int, int], generator=None) -> np.ndarray:
        return segment_mask(closest(segments, self.coverage_ratio), image_size)

    def cached_coverage(self) -> float:
        return self.coverage_ratio


def segment_mask(seg: Segment | None, image_size: tuple[int, int]) -> np.ndarray:
    """A chosen segment as an (H, W) uint8 array, 1 = hidden; all zero for None (no segment).
    ``image_size`` is (W, H)."""
    if seg is None:
        w, h = image_size
        return np.zeros((h, w), dtype=np.uint8)
    if seg.size is not None:  # before decoding: a crafted size would allocate gigabytes
        try:
            check_mask_not_huge(seg.size, image_size)
        except ValueError as e:
            raise MaskFileError(f"{seg.where}: {e}. Regenerate its masks from the image") from None
    return seg.decode()


class Counter:
    """A count shared by the data-loader workers (fork-shared memory) or a plain int."""

    def __init__(self, shared: bool = True):
        self._value = multiprocessing.Value("q", 0) if shared else None
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

    def segments(self, rel: str) -> ImageSegments:
        """Every segment of image rel, in the file's order; only the index is read."""
        raise NotImplementedError

    def present(self, stems: set[str]) -> set[str]:
        """Which of these image stems (rel without extension, normalised) have masks: one listing
        per folder of masks/, never one per image."""
        if self.listed is None:
            self.listed = scan(self.mask_root, stems)[0][self.listing]
        return self.listed & stems

    def generator(self, rel: str) -> str:
        """What made image rel's masks, in words (for pictures and reports)."""
        return "SAM"


# ------------------------------------------------------------------------------------------------
# json: masks/<class>/<stem>.json

GENERATOR_NAMES = {"sam": "SAM", "sam2": "SAM 2", "superpixels": "superpixels"}
# the folder layouts' masks, read there or converted to JSON by tools/convert_masks.py
CONVERTED_NAMES = {"segmae": "SAM (segmae layout)", "amg": "SAM (amg.py)"}
RANDOM_WEIGHTS = "random-weights"  # what a file made without a checkpoint records as its checkpoint


def json_segments(anns: list[dict], choice: str, path: str, frame: str = UNKNOWN) -> ImageSegments:
    """The ImageSegments of one SAM mask file's annotations (read from masks/ or from a tar shard);
    ``choice`` 'segmae' marks a file converted from the original's layout (its tie rule); ``frame``
    the picture its masks were made on (sam/files.py recorded_frame)."""
    coverages = annotation_coverages(anns, path)  # checks every annotation's area and size

    def make(i: int) -> Segment:
        seg = anns[i]["segmentation"]
        return Segment(coverages[i], mask_size(seg), _rle_decoder(seg, path), path,
                       lambda: {k: v for k, v in anns[i].items() if k != "segmentation"}, seg)
    return ImageSegments(coverages, make, path, "larger" if choice == "segmae" else "first", frame)


def _rle_decoder(segmentation: dict, path: str) -> Callable[[], np.ndarray]:
    def decode() -> np.ndarray:
        try:
            return decode_segmentation(segmentation)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise MaskFileError(f"invalid RLE in {path}: {e}. Regenerate this mask file") from None
    return decode


class JsonMasks(MaskSource):
    """masks/<class>/<stem>.json: SAM's automatic mask generator with output_mode='coco_rle'."""

    format = "json"
    listing = "json"  # which of the scan's listings holds this layout's images

    def location(self, rel: str) -> str:
        return os.path.join(self.mask_root, os.path.splitext(rel)[0] + MASK_SUFFIX)

    def segments(self, rel: str) -> ImageSegments:
        path = self.location(rel)
        anns, choice, frame = load_mask_json(path)
        segments = json_segments(anns, choice, path, frame)
        if segments.ties == "larger" and is_unsorted(segments.coverages):
            self.unsorted.add()  # closest sorts it first, where the original would pick by position
        return segments

    def generator(self, rel: str) -> str:
        try:
            with open(self.location(rel), "rb") as f:
                data = json.loads(f.read())
        except (OSError, ValueError, RecursionError):
            return "SAM"
        return describe_generator(data.get("generator") if isinstance(data, dict) else None)


def describe_generator(entry: dict | None) -> str:
    """A mask file's "generator" entry in words: 'SAM vit_h', 'SAM 2 hiera_large (random weights)',
    'superpixels'. A file that records none (SA-1B, SAM's own scripts) is SAM's, and so is one
    converted from the segmae or amg.py layout (named as read there)."""
    if not isinstance(entry, dict):
        return "SAM"
    backend = str(entry.get("backend", ""))
    if not backend:  # SAM's, as a file without the entry; tools/convert_masks.py records the layout it read
        return CONVERTED_NAMES.get(str(entry.get("converted_from", "")), "SAM")
    words = [GENERATOR_NAMES.get(backend, backend)]
    if entry.get("model"):
        words.append(str(entry["model"]))
    if entry.get("checkpoint") == RANDOM_WEIGHTS:
        words.append("(random weights)")
    return " ".join(words)


# ------------------------------------------------------------------------------------------------
# one folder of PNGs per image: segmae's table.txt and amg.py's metadata.csv

def read_png_mask(path: str, thresholded: Counter | None = None) -> np.ndarray:
    """A mask PNG -> (H, W) uint8 0/1 (pixel >= 128 is the segment). PNGs that are not strictly
    0/255 (resampled, antialiased) are thresholded and counted."""
    try:
        with open(path, "rb") as f, Image.open(f) as img:
            if img.mode == "1":
                return np.asarray(img, dtype=np.uint8)
            if img.mode.startswith("I;16") or img.mode == "I":
                values = (np.asarray(img, dtype=np.int64) >> 8).astype(np.uint8)
            else:
                values = np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise MaskFileError(f"mask PNG not found: {path}") from None
    except IMAGE_ERRORS as e:
        raise MaskFileError(f"cannot read mask PNG {path}: {e}. Regenerate it") from None
    if thresholded is not None and ((values != 0) & (values != 255)).any():
        thresholded.add()
    return (values >= 128).astype(np.uint8)


def png_size(path: str) -> tuple[int, int]:
    """(H, W) of a PNG from its header, without decoding it."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise MaskFileError(f"mask PNG not found: {path}") from None
    except IMAGE_ERRORS as e:
        raise MaskFileError(f"cannot read mask PNG {path}: {e}. Regenerate it") from None
    return h, w


class _FolderMasks(MaskSource):
    """One folder per image, masks/<class>/<stem>/, holding an index file and PNGs."""

    index_name = ""
    listing = "folders"  # a folder named after an image is that image's mask folder

    def location(self, rel: str) -> str:
        return os.path.join(self.mask_root, os.path.splitext(rel)[0])

    def index_file(self, rel: str) -> str:
        return os.path.join(self.location(rel), self.index_name)

    def _read_index(self, rel: str) -> str:
        path = self.index_file(rel)
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            folder = self.location(rel)
            other = [n for n in (SEGMAE_TABLE, AMG_METADATA) if n != self.index_name
                     and os.path.exists(os.path.join(folder, n))]
            hint = (f"; it holds {other[0]}, which is another layout: every image of a root needs the same one"
                    if other else "")
            raise MaskFileError(f"mask index not found: {path}{hint}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MaskFileError(f"cannot read mask index {path}: {e}") from None

    def _png(self, folder: str, name: str, coverage: float, size: tuple[int, int] | None,
             read_fields: Callable[[], dict] = dict) -> Segment:
        path = os.path.join(folder, name)
        return Segment(coverage, size, lambda: read_png_mask(path, self.thresholded), path, read_fields)


class SegmaeMasks(_FolderMasks):
    """The original segmae code's layout: table.txt lists '<coverage> <png name>' per segment."""

    format = "segmae"
    index_name = SEGMAE_TABLE

    def generator(self, rel: str) -> str:
        return CONVERTED_NAMES[self.format]

    def segments(self, rel: str) -> ImageSegments:
        folder, path = self.location(rel), self.index_file(rel)
        entries = []
        for n, line in enumerate(self._read_index(rel).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                coverage = float(parts[0])
                if len(parts) != 2 or not math.isfinite(coverage) or coverage < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise MaskFileError(f"{path}, line {n}: {line.strip()!r} is not '<coverage percent> <png name>'") from None
            if os.path.basename(parts[1]) != parts[1]:
                raise MaskFileError(f"{path}, line {n}: {parts[1]!r} is not a file name in {folder}")
            entries.append((coverage, parts[1]))
        coverages = [c for c, _ in entries]
        if is_unsorted(coverages):
            self.unsorted.add()  # closest sorts it first, where the original would pick by position
        return ImageSegments(coverages, lambda i: self._png(folder, entries[i][1], coverages[i], None), path, "larger")


class AmgMasks(_FolderMasks):
    """segment-anything's scripts/amg.py default output: metadata.csv, row i for i.png. amg.py
    reads each image with OpenCV, which applies its EXIF orientation: the masks are of the
    displayed picture."""

    format = "amg"
    index_name = AMG_METADATA

    def generator(self, rel: str) -> str:
        return CONVERTED_NAMES[self.format]

    def segments(self, rel: str) -> ImageSegments:
        # only the id and area columns are read up front, and one PNG header (every mask of an
        # image has its size); the rest of a row when its fields are asked for
        folder, path = self.location(rel), self.index_file(rel)
        rows = _amg_rows(self._read_index(rel), path)
        header = [c.strip() for c in rows[0]]
        rows = [r for r in rows[1:] if r]
        if not rows:
            return ImageSegments([], lambda i: None, path, frame=DISPLAYED)
        try:
            areas = [float(r[1]) for r in rows]
            if not all(math.isfinite(a) and a >= 0 for a in areas):
                raise ValueError
        except (IndexError, ValueError):
            raise MaskFileError(f"{path}: an 'area' is not a finite number >= 0") from None
        names = [f"{r[0].strip()}.png" for r in rows]
        outside = next((r[0] for r in rows if os.path.basename(r[0].strip()) != r[0].strip() or
                        r[0].strip() in ("", ".", "..")), None)
        if outside is not None:  # the id names a PNG of this folder, never a path elsewhere
            raise MaskFileError(f"{path}: the id {outside[:60]!r} is not the name of a PNG in {folder}")
        h, w = png_size(os.path.join(folder, names[0]))
        coverages = [100.0 * a / (h * w) for a in areas]

        def make(i: int) -> Segment:
            return self._png(folder, names[i], coverages[i], (h, w), lambda: _amg_fields(header, rows[i], path))
        return ImageSegments(coverages, make, path, frame=DISPLAYED)  # amg.py reads with OpenCV: orientation applied


def _amg_rows(text: str, path: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]][:2] != AMG_HEADER[:2]:
        raise MaskFileError(f"{path} does not start with amg.py's header ({','.join(AMG_HEADER[:3])},...)")
    return rows


def _amg_fields(header: list[str], row: list[str], path: str) -> dict:
    """amg.py's CSV row as SAM's annotation fields."""
    values = dict(zip(header, (c.strip() for c in row)))
    try:
        num = lambda k: float(values[k])  # noqa: E731
        fields = {"area": int(round(num("area")))}
        if "bbox_x0" in values:
            fields["bbox"] = [num("bbox_x0"), num("bbox_y0"), num("bbox_w"), num("bbox_h")]
        if "point_input_x" in values:
            fields["point_coords"] = [[num("point_input_x"), num("point_input_y")]]
        for key in ("predicted_iou", "stability_score"):
            if key in values:
                fields[key] = num(key)
        if "crop_box_x0" in values:
            fields["crop_box"] = [num("crop_box_x0"), num("crop_box_y0"), num("crop_box_w"), num("crop_box_h")]
    except (KeyError, ValueError):
        raise MaskFileError(f"{path}: not an amg.py metadata row ({','.join(row)[:80]})") from None
    return fields


# ------------------------------------------------------------------------------------------------

SOURCES = {cls.format: cls for cls in (JsonMasks, SegmaeMasks, AmgMasks)}


def mask_source(mask_root: str, mask_format: str, shared_counters: bool = True) -> MaskSource:
    """The reader of a root's masks/ in this layout."""
    if mask_format not in SOURCES:
        raise MaskFileError(f"unknown mask format {mask_format!r}; choose one of auto, {', '.join(MASK_FORMATS)}")
    return SOURCES[mask_format](mask_root, shared_counters)


def open_mask_source(mask_root: str, stems: set[str], mask_format: str = "auto",
                     shared_counters: bool = True) -> MaskSource:
    """The reader of a root's masks/ for these image stems (auto: detected). The listing that
    detects the layout also answers which images have masks (``present``): one listing at start-up."""
    listed = None
    if mask_format in (None, "auto"):
        listed, seen = scan(mask_root, stems)
        mask_format = _detect(mask_root, seen)
    source = mask_source(mask_root, mask_format, shared_counters)
    if listed is not None:
        source.listed = listed[source.listing]
    return source
