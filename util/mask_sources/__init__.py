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
chosen segment. Start-up lists the class folders of masks/ once and opens no table or CSV
(``check_images``; a restart reads its saved result).
"""
from __future__ import annotations

from util.mask_sources.base import Counter, MaskSource, Segment, segment_mask  # noqa: F401
from util.mask_sources.folder_layouts import AmgMasks, SegmaeMasks, closest_larger, png_size, read_png_mask  # noqa: F401
from util.mask_sources.json_layout import RANDOM_WEIGHTS, JsonMasks, describe_generator  # noqa: F401
from util.mask_sources.walk import (AMG_HEADER, AMG_METADATA, EMPTY_LIST, MASK_FORMATS, SEGMAE_TABLE,  # noqa: F401
                                    MaskCheck, _detect, check_images, detect_format, read_empty_list, scan, stem_of)
from util.sam_masks import MaskFileError

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
