"""SAM mask files: reading them, choosing one segment by coverage, decoding its RLE.

A mask file is what SAM's automatic mask generator writes with ``output_mode="coco_rle"``: either
SA-1B's per-image form ``{"image": {...}, "annotations": [...]}`` or a bare list of annotations,
each with ``segmentation: {"size": [H, W], "counts": RLE}`` and ``area`` in pixels.
"""
from __future__ import annotations

import json
import os

import numpy as np
from pycocotools import mask as mask_utils

from util.errors import UserError
from util.checkpoint import atomic_write, atomic_write_json

MASK_SUFFIX = ".json"


class MaskFileError(UserError):
    """A mask file that is missing, unreadable or not in the SAM format."""


def load_annotations(path: str) -> list[dict]:
    """Reads a SAM mask file and returns its list of annotations."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise MaskFileError(f"mask file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise MaskFileError(f"cannot read mask file {path}: {e}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(annotations, list):
        raise MaskFileError(f"{path} is not a SAM mask file: expected a list of annotations or a dict "
                            f"with an 'annotations' list")
    return annotations


def annotation_coverage(annotation: dict) -> float:
    """Percent of the image covered: 100 * area / (H * W)."""
    h, w = annotation["segmentation"]["size"]
    return 100.0 * float(annotation["area"]) / float(h * w)


def select_annotation(annotations: list[dict], coverage_ratio: float) -> dict | None:
    """The annotation whose coverage (percent) is closest to ``coverage_ratio``; ties go to the
    first. Only ``area`` and ``size`` are read; no RLE is decoded. None for an empty list."""
    best, best_dist = None, float("inf")
    for ann in annotations:
        dist = abs(annotation_coverage(ann) - coverage_ratio)
        if dist < best_dist:
            best, best_dist = ann, dist
    return best


def decode_segmentation(segmentation: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list of counts) -> (H, W) uint8 array of 0/1."""
    h, w = segmentation["size"]
    counts = segmentation["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle)


def encode_segmentation(mask: np.ndarray) -> dict:
    """(H, W) binary array -> SAM's coco_rle dict {"size": [H, W], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def load_segment(path: str, coverage_ratio: float, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The chosen segment of a mask file as an (H, W) uint8 array, 1 = hidden.

    A file without annotations gives an all-zero mask (nothing hidden); ``image_size`` (W, H) is
    only used for that case.
    """
    annotations = load_annotations(path)
    try:
        ann = select_annotation(annotations, coverage_ratio)
        if ann is not None:
            return decode_segmentation(ann["segmentation"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise MaskFileError(f"malformed annotation in {path} ({type(e).__name__}: {e}); each needs "
                            f"'area' and 'segmentation': {{'size': [H, W], 'counts': RLE}}") from None
    if image_size is None:
        raise MaskFileError(f"{path} has no annotations")
    w, h = image_size
    return np.zeros((h, w), dtype=np.uint8)


def mask_path_for(mask_root: str, image_rel_path: str) -> str:
    """masks/<class>/<image stem>.json for the image train/<class>/<image>."""
    return os.path.join(mask_root, os.path.splitext(image_rel_path)[0] + MASK_SUFFIX)


def write_mask_file(path: str, annotations: list[dict], image_info: dict | None = None,
                    bare_list: bool = False) -> None:
    """Writes a mask file atomically: SA-1B's {"image", "annotations"} form, or a bare list."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_json(path, annotations if bare_list else {"image": image_info or {}, "annotations": annotations})


# ------------------------------------------------------------------------------------------------
# The compact mask cache: for one coverage ratio, only the chosen segment of every mask file, so
# that training never parses a full SAM JSON file (tools/build_mask_cache.py writes it).
#   <root>/masks_cache/coverage_<C>.bin        the chosen RLE count strings, concatenated (ASCII)
#   <root>/masks_cache/coverage_<C>.npz        keys (relative image paths, sorted), offset, length,
#                                              height, width (length -1: no annotation)

def mask_cache_paths(root: str, coverage_ratio: float) -> tuple[str, str]:
    base = os.path.join(root, "masks_cache", f"coverage_{coverage_ratio:g}")
    return base + ".bin", base + ".npz"


def build_mask_cache(root: str, image_rel_paths: list[str], coverage_ratio: float) -> str:
    """Writes the cache for these images (their mask files must exist); returns the .bin path."""
    bin_path, index_path = mask_cache_paths(root, coverage_ratio)
    os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    keys = sorted(image_rel_paths)
    offset = np.zeros(len(keys), np.int64)
    length = np.full(len(keys), -1, np.int64)
    height = np.zeros(len(keys), np.int32)
    width = np.zeros(len(keys), np.int32)
    with atomic_write(bin_path) as out:
        pos = 0
        for i, rel in enumerate(keys):
            ann = select_annotation(load_annotations(mask_path_for(os.path.join(root, "masks"), rel)), coverage_ratio)
            if ann is None:
                continue
            seg = ann["segmentation"]
            if isinstance(seg["counts"], list):  # store uncompressed RLE compressed
                seg = encode_segmentation(decode_segmentation(seg))
            counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else bytes(seg["counts"])
            out.write(counts)
            offset[i], length[i] = pos, len(counts)
            height[i], width[i] = seg["size"]
            pos += len(counts)
    with atomic_write(index_path) as f:  # written last: the cache counts as present only now
        np.savez(f, keys=np.array(keys), offset=offset, length=length, height=height, width=width,
                 coverage_ratio=np.float64(coverage_ratio))
    return bin_path


class MaskCache:
    """Reads chosen segments from the cache: one pread and one RLE decode per sample."""

    def __init__(self, root: str, coverage_ratio: float):
        self.bin_path, index_path = mask_cache_paths(root, coverage_ratio)
        index = np.load(index_path)
        self.row = {k: i for i, k in enumerate(index["keys"].tolist())}
        self.offset, self.length = index["offset"], index["length"]
        self.height, self.width = index["height"], index["width"]
        self._fd = None  # opened lazily: one descriptor per data-loader worker

    @staticmethod
    def exists(root: str, coverage_ratio: float) -> bool:
        return all(os.path.exists(p) for p in mask_cache_paths(root, coverage_ratio))

    def __contains__(self, rel: str) -> bool:
        return rel in self.row

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def load(self, rel: str, image_size: tuple[int, int]) -> np.ndarray:
        i = self.row[rel]
        if self.length[i] < 0:
            w, h = image_size
            return np.zeros((h, w), dtype=np.uint8)
        if self._fd is None:
            self._fd = os.open(self.bin_path, os.O_RDONLY)
        counts = os.pread(self._fd, int(self.length[i]), int(self.offset[i]))
        return mask_utils.decode({"size": [int(self.height[i]), int(self.width[i])], "counts": counts})
