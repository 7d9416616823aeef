"""masks/<class>/<stem>.json: SAM's coco_rle output, per image (SA-1B's form or a bare list)."""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from util.mask_sources.base import MaskSource, Segment
from util.mask_sources.folder_layouts import closest_larger
from util.sam_masks import (MASK_SUFFIX, MaskFileError, annotation_coverages, closest_first, decode_segmentation,
                            load_annotations, load_mask_json, mask_size)



class JsonMasks(MaskSource):
    """masks/<class>/<stem>.json: SAM's automatic mask generator with output_mode='coco_rle'."""

    format = "json"
    listing = "json"  # which of the scan's listings holds this layout's images

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
        return self.choose_in(*load_mask_json(path), path, coverage_ratio)

    def choose_in(self, anns: list[dict], choice: str, path: str, coverage_ratio: float) -> Segment | None:
        """The chosen segment of one mask file's annotations (read from masks/ or from a shard)."""
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
