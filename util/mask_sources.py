"""Where a data root's SAM masks come from: one reader per layout on disk behind one interface.

    json    masks/<class>/<stem>.json               SAM's coco_rle output (SA-1B per-image form or a
                                                    bare list of annotations); ties go to the first
    segmae  masks/<class>/<stem>/table.txt + PNGs   the original segmae code: one line
                                                    "<coverage percent> <png name>" per segment, binary
                                                    'L' PNGs (255 = segment); ties go to the larger
                                                    coverage, above the largest: the largest
    amg     masks/<class>/<stem>/metadata.csv       segment-anything's scripts/amg.py default output:
            + 0.png, 1.png, ...                     row i describes i.png; coverage from its `area`

The layout is detected per root (``--mask_format`` forces one); a root mixing layouts is an error.
``train/emptyfiles.txt`` (or ``<root>/emptyfiles.txt``), the original's list of image file names
without masks, leaves those images out of the dataset, whatever the layout.

The hot path reads one small index (the JSON, table.txt or metadata.csv) and decodes only the
chosen segment. Start-up lists the class folders of masks/ once and opens no table or CSV.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from util.images import IMAGE_ERRORS
from util.sam_masks import (MASK_SUFFIX, MaskFileError, annotation_coverages, closest_first,
                            check_mask_not_huge, decode_segmentation, load_annotations, load_mask_json,
                            mask_size)

MASK_FORMATS = ("json", "segmae", "amg")
SEGMAE_TABLE = "table.txt"
AMG_METADATA = "metadata.csv"
AMG_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
              "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h").split(",")
EMPTY_LIST = "emptyfiles.txt"


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


def closest_larger(coverages: list[float], coverage_ratio: float) -> tuple[int | None, bool]:
    """The original segmae code's choice, as an index into coverages: the closest coverage, equal
    distance to the larger one, above the largest the largest. The original assumes the table is
    sorted by coverage (as it writes them) and picks wrongly otherwise; an unsorted one is sorted
    here first (stable), and the second value says it was."""
    if not coverages:
        return None, False
    order = list(range(len(coverages)))
    unsorted = any(a > b for a, b in zip(coverages, coverages[1:]))
    if unsorted:
        order.sort(key=lambda i: coverages[i])
    ordered = [coverages[i] for i in order]
    if coverage_ratio >= ordered[-1]:
        return order[-1], unsorted
    above = bisect.bisect_left(ordered, coverage_ratio)  # the first coverage >= the ratio
    if above > 0 and abs(ordered[above - 1] - coverage_ratio) < abs(ordered[above] - coverage_ratio):
        above -= 1
    return order[above], unsorted


class MaskSource:
    """The masks of one root in one layout. ``rel`` is an image's path relative to train/."""

    format = ""

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
        seg = self.chosen(rel, coverage_ratio)
        if seg is None:
            w, h = image_size
            return np.zeros((h, w), dtype=np.uint8)
        if seg.size is not None:  # before decoding: a crafted size would allocate gigabytes
            try:
                check_mask_not_huge(seg.size, image_size)
            except ValueError as e:
                raise MaskFileError(f"{seg.where}: {e}. Regenerate its masks from the image") from None
        return seg.decode()

    def present(self, stems: set[str]) -> set[str]:
        """Which of these image stems (rel without extension, normalised) have masks: one listing
        per folder of masks/, never one per image."""
        raise NotImplementedError

    def generator(self, rel: str) -> str:
        """What made image rel's masks, in words (for pictures and reports)."""
        return "SAM"


class JsonMasks(MaskSource):
    """masks/<class>/<stem>.json: SAM's automatic mask generator with output_mode='coco_rle'."""

    format = "json"

    def location(self, rel: str) -> str:
        return os.path.join(self.mask_root, os.path.splitext(rel)[0] + MASK_SUFFIX)

    def segments(self, rel: str) -> list[Segment]:
        path = self.location(rel)
        anns = load_annotations(path)
        coverages = annotation_coverages(anns, path)
        return [Segment(c, mask_size(a["segmentation"]), _rle_decoder(a["segmentation"], path), f"{path} #{i}",
                        {k: v for k, v in a.items() if k != "segmentation"}, a["segmentation"])
                for i, (c, a) in enumerate(zip(coverages, anns))]

    def chosen(self, rel: str, coverage_ratio: float) -> Segment | None:
        # the hot path: only area and size are read, the chosen RLE alone is decoded
        path = self.location(rel)
        anns, choice = load_mask_json(path)
        coverages = annotation_coverages(anns, path)
        if choice == "segmae":  # converted from the original's layout: its choice, exactly
            i, unsorted = closest_larger(coverages, coverage_ratio)
            if unsorted:
                self.unsorted.add()
        else:
            i = closest_first(coverages, coverage_ratio)
        if i is None:
            return None
        seg = anns[i]["segmentation"]
        # its size was checked by annotation_coverages
        return Segment(coverages[i], mask_size(seg), _rle_decoder(seg, path), path, rle=seg)

    def present(self, stems: set[str]) -> set[str]:
        if self.listed is None:
            self.listed = scan(self.mask_root, stems)[0]["json"]
        return self.listed & stems

    def generator(self, rel: str) -> str:
        try:
            with open(self.location(rel), "rb") as f:
                data = json.loads(f.read())
        except (OSError, ValueError, RecursionError):
            return "SAM"
        return describe_generator(data.get("generator") if isinstance(data, dict) else None)


GENERATOR_NAMES = {"sam": "SAM", "sam2": "SAM 2", "superpixels": "superpixels"}
RANDOM_WEIGHTS = "random-weights"  # what a file made without a checkpoint records as its checkpoint


def describe_generator(entry: dict | None) -> str:
    """A mask file's "generator" entry in words: 'SAM vit_h', 'SAM 2 hiera_large (random weights)',
    'superpixels'. A file that records none (SA-1B, SAM's own scripts) is SAM's."""
    if not isinstance(entry, dict):
        return "SAM"
    backend = str(entry.get("backend", ""))
    words = [GENERATOR_NAMES.get(backend, backend or "unknown generator")]
    if entry.get("model"):
        words.append(str(entry["model"]))
    if entry.get("checkpoint") == RANDOM_WEIGHTS:
        words.append("(random weights)")
    return " ".join(words)


def _rle_decoder(segmentation: dict, path: str) -> Callable[[], np.ndarray]:
    def decode() -> np.ndarray:
        try:
            return decode_segmentation(segmentation)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise MaskFileError(f"invalid RLE in {path}: {e}. Regenerate this mask file") from None
    return decode


class _FolderMasks(MaskSource):
    """One folder per image, masks/<class>/<stem>/, holding an index file and PNGs."""

    index_name = ""

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

    def _png(self, folder: str, name: str, coverage: float, size: tuple[int, int] | None, fields: dict) -> Segment:
        path = os.path.join(folder, name)
        return Segment(coverage, size, lambda: read_png_mask(path, self.thresholded), path, fields)

    def present(self, stems: set[str]) -> set[str]:
        if self.listed is None:  # a folder named after an image is that image's mask folder
            self.listed = scan(self.mask_root, stems)[0]["folders"]
        return self.listed & stems


class SegmaeMasks(_FolderMasks):
    """The original segmae code's layout: table.txt lists '<coverage> <png name>' per segment."""

    format = "segmae"
    index_name = SEGMAE_TABLE

    def generator(self, rel: str) -> str:
        return "SAM (segmae layout)"

    def segments(self, rel: str) -> list[Segment]:
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
        return [self._png(folder, name, coverage, None, {}) for coverage, name in entries]

    def choose(self, segments: list[Segment], coverage_ratio: float) -> Segment | None:
        i, unsorted = closest_larger([s.coverage for s in segments], coverage_ratio)
        if unsorted:
            self.unsorted.add()
        return None if i is None else segments[i]


class AmgMasks(_FolderMasks):
    """segment-anything's scripts/amg.py default output: metadata.csv, row i for i.png."""

    format = "amg"
    index_name = AMG_METADATA

    def generator(self, rel: str) -> str:
        return "SAM (amg.py)"

    def segments(self, rel: str) -> list[Segment]:
        folder, path = self.location(rel), self.index_file(rel)
        rows = _amg_rows(self._read_index(rel), path)
        header = [c.strip() for c in rows[0]]
        if not rows[1:]:
            return []
        size = png_size(os.path.join(folder, f"{rows[1][0].strip()}.png"))  # every mask of an image has its size
        out = []
        for n, row in enumerate(rows[1:], 2):
            if not row:
                continue
            try:
                values = dict(zip(header, (c.strip() for c in row)))
                area = float(values["area"])
                if not math.isfinite(area) or area < 0:
                    raise ValueError
                fields = _amg_fields(values)
            except (KeyError, ValueError):
                raise MaskFileError(f"{path}, line {n}: not an amg.py metadata row ({','.join(row)[:80]})") from None
            out.append(self._png(folder, f"{values['id']}.png", 100.0 * area / (size[0] * size[1]), size, fields))
        return out

    def chosen(self, rel: str, coverage_ratio: float) -> Segment | None:
        # the hot path: only the id and area columns are read, one PNG header and one PNG decoded
        folder, path = self.location(rel), self.index_file(rel)
        rows = [r for r in _amg_rows(self._read_index(rel), path)[1:] if r]
        if not rows:
            return None
        try:
            areas = [float(r[1]) for r in rows]
            if not all(math.isfinite(a) and a >= 0 for a in areas):
                raise ValueError
        except (IndexError, ValueError):
            raise MaskFileError(f"{path}: an 'area' is not a finite number >= 0") from None
        h, w = png_size(os.path.join(folder, f"{rows[0][0].strip()}.png"))
        i = closest_first([100.0 * a / (h * w) for a in areas], coverage_ratio)
        return self._png(folder, f"{rows[i][0].strip()}.png", 100.0 * areas[i] / (h * w), (h, w), {})


def _amg_rows(text: str, path: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]][:2] != AMG_HEADER[:2]:
        raise MaskFileError(f"{path} does not start with amg.py's header ({','.join(AMG_HEADER[:3])},...)")
    return rows


def _amg_fields(values: dict) -> dict:
    """amg.py's CSV row as SAM's annotation fields."""
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
    return fields


SOURCES = {cls.format: cls for cls in (JsonMasks, SegmaeMasks, AmgMasks)}


def _walk(root: str, is_leaf: Callable[[str], bool]) -> Iterable[tuple[str, list[str], list[str]]]:
    """(folder relative to root, sub-folder names, file names) for every folder under root; a
    folder for which is_leaf(its relative path) holds is listed in its parent but not entered.
    Symbolic links to folders are followed; a link whose target is gone is left out. Hidden names
    (a leading dot) are skipped."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel_dir)))
        except OSError:
            continue
        dirs, files = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links
                exists = is_dir or not entry.is_symlink() or os.path.exists(entry.path)
            except OSError:
                continue
            if not exists:  # a link whose target is gone
                continue
            (dirs if is_dir else files).append(entry.name)
        yield rel_dir, dirs, files
        for name in dirs:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not is_leaf(rel):
                stack.append(rel)


def scan(mask_root: str, stems: set[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """One walk of masks/: the image stems that have a .json file, those that have a folder, and
    the layouts seen with an example each (the first image folder of every class folder is looked
    into for table.txt or metadata.csv). Folders named after an image are not entered."""
    listed: dict[str, set[str]] = {"json": set(), "folders": set()}
    seen: dict[str, str] = {}
    for rel_dir, dirs, files in _walk(mask_root, lambda rel: rel in stems):
        for name in files:
            if name.endswith(MASK_SUFFIX):
                listed["json"].add(os.path.normpath(os.path.join(rel_dir, name[:-len(MASK_SUFFIX)])))
                seen.setdefault("json", os.path.join(mask_root, rel_dir, name))
        folders = [d for d in dirs if os.path.normpath(os.path.join(rel_dir, d)) in stems]
        listed["folders"].update(os.path.normpath(os.path.join(rel_dir, d)) for d in folders)
        if folders:
            path = os.path.join(mask_root, rel_dir, folders[0])
            for fmt, index in (("segmae", SEGMAE_TABLE), ("amg", AMG_METADATA)):
                if os.path.exists(os.path.join(path, index)):
                    seen.setdefault(fmt, os.path.join(path, index))
                    break
    return listed, seen


def detect_format(mask_root: str, stems: set[str]) -> str:
    """The layout of masks/: .json files, or per-image folders with table.txt (segmae) or
    metadata.csv (amg); a mix is an error naming both layouts with an example of each."""
    return _detect(mask_root, scan(mask_root, stems)[1])


def _detect(mask_root: str, seen: dict[str, str]) -> str:
    if len(seen) > 1:
        listed = "; ".join(f"{fmt} (e.g. {example})" for fmt, example in seen.items())
        raise MaskFileError(f"{mask_root} mixes mask layouts: {listed}. Keep one layout per data root (convert the "
                            f"others with tools/convert_masks.py), or force one with --mask_format")
    return next(iter(seen), "json")


def open_mask_source(mask_root: str, stems: set[str], mask_format: str = "auto",
                     shared_counters: bool = True) -> MaskSource:
    """The reader of a root's masks/ for these image stems (auto: detected). The walk that
    detects the layout also answers which images have masks (``present``): one walk at start-up."""
    listed = None
    if mask_format in (None, "auto"):
        listed, seen = scan(mask_root, stems)
        mask_format = _detect(mask_root, seen)
    if mask_format not in SOURCES:
        raise MaskFileError(f"unknown mask format {mask_format!r}; choose one of auto, {', '.join(MASK_FORMATS)}")
    source = SOURCES[mask_format](mask_root, shared_counters)
    if listed is not None:
        source.listed = listed["json" if mask_format == "json" else "folders"]
    return source


def read_empty_list(root: str, split: str = "train") -> set[str]:
    """Image file names listed in the original's emptyfiles.txt (train/ or the root), if any."""
    names: set[str] = set()
    for path in (os.path.join(root, split, EMPTY_LIST), os.path.join(root, EMPTY_LIST)):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                names |= {line.strip() for line in f if line.strip()}
    return names


def stem_of(rel: str) -> str:
    return os.path.normpath(os.path.splitext(rel)[0])
