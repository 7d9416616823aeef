"""One folder of PNGs per image: the original segmae code's table.txt layout and
segment-anything's amg.py output (metadata.csv)."""
from __future__ import annotations

import bisect
import csv
import io
import math
import os

import numpy as np
from PIL import Image

from util.images import IMAGE_ERRORS
from util.mask_sources.base import Counter, MaskSource, Segment
from util.mask_sources.walk import AMG_HEADER, AMG_METADATA, SEGMAE_TABLE
from util.sam_masks import MaskFileError, closest_first



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

    def _png(self, folder: str, name: str, coverage: float, size: tuple[int, int] | None, fields: dict) -> Segment:
        path = os.path.join(folder, name)
        return Segment(coverage, size, lambda: read_png_mask(path, self.thresholded), path, fields)


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
