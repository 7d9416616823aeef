"""SAM mask files: reading them, choosing one segment by coverage, decoding its RLE, their names
(one mask file per image stem). How a mask is fitted to its image is sam/geometry.py; the
layouts on disk, sam/layouts.py.

A mask file is what SAM's automatic mask generator writes with ``output_mode="coco_rle"``: either
SA-1B's per-image form ``{"image": {...}, "annotations": [...]}`` or a bare list of annotations,
each with ``segmentation: {"size": [H, W], "counts": RLE}`` and ``area`` in pixels.
"""
from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import numpy as np
from pycocotools import mask as mask_utils

from run.files import atomic_write_json
from util.misc import UserError

MASK_SUFFIX = ".json"
# the picture a mask was made on (sam/geometry.py maps it onto the stored pixels): the image file's
# stored pixels, the picture as displayed (its EXIF orientation applied), or not recorded
STORED, DISPLAYED, UNKNOWN = "stored", "displayed", "unknown"
OWN_BACKENDS = ("sam", "sam2", "superpixels")  # tools/generate_masks.py: it reads the stored pixels


class MaskFileError(UserError):
    """A SAM mask file that cannot be read or does not fit its image; the message names it."""


class MaskJson(NamedTuple):
    """A SAM mask file's content: its annotations, its tie rule ('segmae' for a file converted from
    the original segmae layout, which records ``"choice": "segmae"``, else 'first') and the frame
    its masks were made in (``recorded_frame``)."""
    annotations: list[dict]
    choice: str
    frame: str


def recorded_frame(data) -> str:
    """The frame a mask file's masks were made in, from its "generator" entry: what it records as
    "frame"; the displayed picture for a file converted from amg.py's layout (OpenCV applied the
    EXIF orientation); the stored pixels for this repo's generator; unknown for anything else
    (SA-1B's files, SAM's own scripts), which is taken as the stored pixels."""
    entry = data.get("generator") if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        return UNKNOWN
    if entry.get("frame") in (STORED, DISPLAYED):
        return entry["frame"]
    if entry.get("converted_from") == "amg":
        return DISPLAYED
    return STORED if entry.get("backend") in OWN_BACKENDS else UNKNOWN


def load_mask_json(path: str) -> MaskJson:
    """A SAM mask file's annotations, tie rule and frame (MaskJson)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MaskFileError(f"mask file not found: {path}") from None
    except OSError as e:
        raise MaskFileError(f"cannot read mask file {path}: {e}") from None
    return parse_mask_json(raw, path)


def parse_mask_json(raw: bytes, where: str) -> MaskJson:
    """load_mask_json for bytes already read (a mask file inside a tar shard); ``where`` names it."""
    try:
        data = json.loads(raw)
    except RecursionError:  # json's parser on a crafted, deeply nested file
        raise MaskFileError(f"cannot read mask file {where}: JSON nested too deeply") from None
    except ValueError as e:
        raise MaskFileError(f"cannot read mask file {where}: {e}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(annotations, list):
        raise MaskFileError(f"{where} is not a SAM mask file: expected a list of annotations or a dict "
                            f"with an 'annotations' list")
    choice = data.get("choice", "first") if isinstance(data, dict) else "first"
    return MaskJson(annotations, choice, recorded_frame(data))


def load_annotations(path: str) -> list[dict]:
    """Reads a SAM mask file and returns its list of annotations."""
    return load_mask_json(path)[0]


def mask_size(segmentation: dict) -> tuple[int, int]:
    """(H, W) of an RLE; a size that is not two positive integers raises ValueError."""
    size = segmentation["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size {size!r} is not [H, W] with positive integers")
    return int(size[0]), int(size[1])


def annotation_coverage(annotation: dict) -> float:
    """Percent of the image covered: 100 * area / (H * W), or the annotation's own ``coverage``
    (files converted from the original segmae layout keep its recorded value). A non-finite value
    raises ValueError (it would otherwise never be chosen, without a word)."""
    h, w = mask_size(annotation["segmentation"])
    if "coverage" in annotation:
        coverage = float(annotation["coverage"])
        if not math.isfinite(coverage) or coverage < 0:
            raise ValueError(f"coverage {annotation['coverage']!r} is not a finite number >= 0")
        return coverage
    area = float(annotation["area"])
    if not math.isfinite(area) or area < 0:
        raise ValueError(f"area {annotation['area']!r} is not a finite number >= 0")
    return 100.0 * area / float(h * w)


def closest_first(coverages: list[float], coverage_ratio: float) -> int | None:
    """Index of the coverage closest to coverage_ratio; ties go to the first (SAM's layouts)."""
    best, best_dist = None, float("inf")
    for i, c in enumerate(coverages):
        dist = abs(c - coverage_ratio)
        if dist < best_dist:
            best, best_dist = i, dist
    return best


def annotation_coverages(annotations: list[dict], path: str) -> list[float]:
    """Every annotation's coverage; a malformed one raises MaskFileError naming the file."""
    try:
        return [annotation_coverage(a) for a in annotations]
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise MaskFileError(f"malformed annotation in {path} ({type(e).__name__}: {e}); each needs a finite "
                            f"'area' and 'segmentation': {{'size': [H, W], 'counts': RLE}}") from None


def select_annotation(annotations: list[dict], coverage_ratio: float) -> dict | None:
    """The annotation whose coverage (percent) is closest to ``coverage_ratio``; ties go to the
    first. Only ``area`` and ``size`` are read; no RLE is decoded. None for an empty list."""
    i = closest_first([annotation_coverage(a) for a in annotations], coverage_ratio)
    return None if i is None else annotations[i]


def rle_string_counts(counts: bytes) -> np.ndarray:
    """The run lengths of a compressed COCO RLE string (pycocotools' format: 5 bits per character
    with a continuation bit, counts after the second stored as differences). ValueError if the
    string is not valid. Vectorised: it runs for every sample the loader reads."""
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    bad = np.flatnonzero((c < 0) | (c >= 64))
    if bad.size:
        raise ValueError(f"character {chr(counts[bad[0]])!r} is not part of a COCO RLE string")
    if c[-1] & 0x20:
        raise ValueError("the RLE string ends inside a count (truncated)")
    ends = np.flatnonzero((c & 0x20) == 0)  # the last character of each count
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    group = np.repeat(np.arange(ends.size), lengths)
    shift = 5 * (np.arange(c.size) - starts[group])
    values = np.bincount(group, weights=(c & 0x1F) * np.exp2(shift), minlength=ends.size).astype(np.int64)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])  # sign-extend
    # counts after the second are differences to the count two before: cumulative sums over
    # the odd indices from 1 and the even indices from 2
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def check_rle(segmentation: dict) -> tuple[int, int, list | bytes]:
    """(H, W, counts) of an RLE whose run lengths are non-negative and add up to H * W; anything
    else raises ValueError. pycocotools decodes short counts to uninitialised memory and long ones
    to an error naming no file, so every reader checks first (the check costs far less than a
    decode)."""
    h, w = mask_size(segmentation)
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        counts = counts.encode("ascii", errors="replace") if isinstance(counts, str) else counts
        runs = rle_string_counts(counts)
    else:
        raise ValueError(f"counts is a {type(counts).__name__}, not an RLE string or list")
    runs = np.asarray(runs, dtype=np.int64)
    if (runs < 0).any():
        raise ValueError("the RLE has a negative run length")
    if int(runs.sum()) != h * w:
        raise ValueError(f"the RLE's run lengths add up to {int(runs.sum())} pixels, but its size {h}x{w} has {h * w}")
    return h, w, counts


def decode_segmentation(segmentation: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list of counts) -> (H, W) uint8 array of 0/1.
    An invalid RLE raises ValueError (see check_rle)."""
    h, w, counts = check_rle(segmentation)
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts}
    return mask_utils.decode(rle)


def choose_segment(path: str, coverage_ratio: float) -> dict | None:
    """The annotation of a mask file closest to coverage_ratio (None if it has none); a malformed
    file raises MaskFileError naming it."""
    annotations = load_annotations(path)
    i = closest_first(annotation_coverages(annotations, path), coverage_ratio)
    return None if i is None else annotations[i]


def encode_segmentation(mask: np.ndarray) -> dict:
    """(H, W) binary array -> SAM's coco_rle dict {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def load_segment(path: str, coverage_ratio: float, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The chosen segment of a mask file as an (H, W) uint8 array, 1 = hidden.

    A file without annotations gives an all-zero mask (nothing hidden); ``image_size`` (W, H) is
    only used for that case.
    """
    ann = choose_segment(path, coverage_ratio)
    if ann is not None:
        try:
            return decode_segmentation(ann["segmentation"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise MaskFileError(f"invalid RLE in {path}: {e}. Regenerate this mask file") from None
    if image_size is None:
        raise MaskFileError(f"{path} has no annotations")
    w, h = image_size
    return np.zeros((h, w), dtype=np.uint8)


def duplicate_stems(rel_paths: list[str], stems: list[str] | None = None) -> list[tuple[str, str]]:
    """Pairs of images that would share one mask file (same folder and stem: x.JPEG and x.png);
    ``stems``: the paths' stems when the caller has them."""
    stems = [os.path.splitext(rel)[0] for rel in rel_paths] if stems is None else stems
    if len(set(stems)) == len(stems):  # the usual case, answered by one set
        return []
    seen: dict[str, str] = {}
    pairs = []
    for rel, stem in zip(rel_paths, stems):
        if stem in seen:
            pairs.append((seen[stem], rel))
        else:
            seen[stem] = rel
    return pairs


def check_unique_stems(rel_paths: list[str], image_root: str, stems: list[str] | None = None) -> None:
    pairs = duplicate_stems(rel_paths, stems)
    if pairs:
        a, b = pairs[0]
        raise MaskFileError(
            f"{len(pairs)} pair(s) of images share a mask file name, e.g. {os.path.join(image_root, a)} and "
            f"{os.path.join(image_root, b)} (both would use {os.path.splitext(a)[0] + MASK_SUFFIX}): rename or remove "
            f"one of each pair")


def mask_path_for(mask_root: str, image_rel_path: str) -> str:
    """masks/<class>/<image stem>.json for the image train/<class>/<image>."""
    return os.path.join(mask_root, os.path.splitext(image_rel_path)[0] + MASK_SUFFIX)


def write_mask_file(path: str, annotations: list[dict], image_info: dict | None = None,
                    bare_list: bool = False, generator: dict | None = None, extra: dict | None = None) -> None:
    """Writes a mask file atomically: SA-1B's {"image", "annotations"} form (plus "generator", the
    settings that made it, when given), or a bare list."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {"image": image_info or {}, "annotations": annotations}
    if generator:
        data["generator"] = generator
    data.update(extra or {})
    atomic_write_json(path, annotations if bare_list else data)
