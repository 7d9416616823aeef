"""One pretraining --data_path root: which of three kinds it is, and (for image folders) opening
it: its images with the SAM masks of each, checked (ImageRoot; inputs/pretrain.py reads its samples).

    <root>/train/<class>/<image>          a split: images in torchvision's ImageFolder layout
    <root>/<class>/<image>                class folders directly inside (an ImageFolder root itself)
    <root>/data.mdb                       an LMDB database of images (inputs/lmdb.py)

    <root>/masks/<class>/<image stem>...   SAM masks mirroring the class folders, in any layout of
                                           sam/layouts.py (SAM's JSON, segmae, amg.py); in a root
                                           of class folders masks/ is not a class

Problems a user can fix (no images, no masks/, missing or mismatched mask files) are found when
the root is opened, not in the middle of an epoch.
"""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
from PIL import Image

from inputs.folders import empty_classes_message, is_hidden, scan_image_folder
from inputs.images import DataError
from inputs.lmdb import is_lmdb_root
from run.distributed import first_rank_on_node
from run.flags import DEFAULT_DATA_TIMEOUT_S
from sam.cache import MaskCache
from sam.files import MaskFileError
from sam.geometry import IMAGE_ERRORS, exif_orientation, mask_fit
from sam.layouts import ClosestSegment, MaskSource, mask_source
from sam.listing import check_images, read_empty_list

# images whose mask size is checked against the image header at start-up (0: all)
DEFAULT_MASK_SIZE_CHECK = 256


SPLIT, CLASS_FOLDERS, LMDB = "split", "class folders", "lmdb"
NOT_CLASSES = ("masks", "masks_cache")  # what this repo keeps inside a root of class folders


def root_kind(root: str, split: str = "train") -> str:
    """Which of the three layouts a --data_path root is: SPLIT (it holds train/), LMDB (data.mdb)
    or CLASS_FOLDERS (any other folder with sub-folders)."""
    if not os.path.isdir(root):
        raise DataError(f"--data_path {root} does not exist or is not a folder")
    if os.path.isdir(os.path.join(root, split)):
        return SPLIT
    if is_lmdb_root(root):
        return LMDB
    with os.scandir(root) as entries:
        if any(e.is_dir() and not is_hidden(e.name) and e.name not in NOT_CLASSES for e in entries):
            return CLASS_FOLDERS
    raise DataError(f"--data_path {root} has no {split}/ folder, no class folders and no LMDB database (data.mdb): "
                    f"expected {split}/<class>/<image> (ImageFolder layout), <class>/<image> directly inside, or "
                    f"an LMDB of images. Make a toy one with: python tools/make_toy_data.py")


def image_folder_of(root: str, split: str = "train") -> tuple[str, tuple[str, ...]]:
    """(the folder holding the class folders, its sub-folders that are no class) of a root of image
    files, for the tools that read a root's images and masks; an LMDB root is an error naming it."""
    kind = root_kind(root, split)
    if kind == LMDB:
        raise DataError(f"--data_path {root} is an LMDB database: it holds no image files to go with SAM masks "
                        f"(only roots of image folders have masks/)")
    return (os.path.join(root, split), ()) if kind == SPLIT else (root, NOT_CLASSES)


class ImageRoot:
    """One root's train/ split, opened: its images (``samples``, an ImageList), the source of
    their SAM masks and the mask cache, after every start-up check. Reading a sample is
    inputs/pretrain.py's SegmentMaskImageFolder, which is this class plus ``read``.

    ``segment_choice`` decides which of an image's segments is hidden: the mask method
    (mask_methods.MaskMethod.hidden_segment and cached_coverage), by default the segment closest
    to ``coverage_ratio`` percent."""

    def __init__(self, root: str, with_masks: bool, coverage_ratio: float = 50.0,
                 split: str = "train", allow_missing_masks: bool = False, decode: bool = True,
                 skip_bad_samples: bool = False, read_timeout: float = DEFAULT_DATA_TIMEOUT_S,
                 mask_format: str = "auto", mask_size_check: int | None = None, segment_choice=None):
        self.root = root
        self.decode = decode
        self.read_timeout = read_timeout
        self.image_root = os.path.join(root, split)
        self.mask_root = os.path.join(root, "masks")
        self.with_masks = with_masks
        self.segment_choice = segment_choice if segment_choice is not None else ClosestSegment(coverage_ratio)

        self.kind = root_kind(root, split)
        if self.kind == CLASS_FOLDERS:
            self.image_root = root
        if with_masks and not os.path.isdir(self.mask_root):
            read_as = "" if self.kind == SPLIT else f" (it has no {split}/ folder and is read as class folders)"
            raise DataError(f"--data_path {root} has no masks/ folder{read_as}, which segment mask methods need "
                            f"(masks/<class>/<image stem>.json, or the segmae / amg.py folders "
                            f"masks/<class>/<image stem>/). Generate SAM masks for it, or pretrain "
                            f"with --mask_method patches.")
        self._open(with_masks, allow_missing_masks, skip_bad_samples, mask_format, mask_size_check)

    def _open(self, with_masks: bool, allow_missing_masks: bool, skip_bad_samples: bool, mask_format: str,
              mask_size_check: int | None) -> None:
        """The scan of the images and of their masks, with every start-up check."""
        scan = scan_image_folder(self.image_root, exclude=NOT_CLASSES if self.kind == CLASS_FOLDERS else ())
        self.classes, self.class_to_idx, self.samples = scan.classes, scan.class_to_idx, scan.samples
        if scan.hidden:
            print(f"{len(scan.hidden)} hidden files or folders under {self.image_root} are skipped, e.g. {scan.hidden[0]}")
        if scan.empty_classes and self.samples:
            if not skip_bad_samples:
                raise DataError(f"{empty_classes_message(scan)}. Remove them, or pass --skip_bad_samples to "
                                f"pretrain without them")
            print(f"WARNING: {empty_classes_message(scan)} (skipped)")
        if not self.samples:
            raise DataError(f"no images found under {self.image_root}")
        self.cache = None
        self.cache_rows: np.ndarray | None = None  # per image: its row in the mask cache, -1 = read masks/
        self.source: MaskSource | None = None
        # masks turned into the image's frame for EXIF-rotated images, counted over the loader's workers
        self.rotated_masks = multiprocessing.Value("q", 0)
        # reads of images with an EXIF orientation other than 1 (the scan opens no file: counted when read)
        self.oriented_images = multiprocessing.Value("q", 0)
        if with_masks:
            self._leave_out_listed_empty()
            check = check_images(self.mask_root, self.samples, mask_format)  # one listing of masks/
            self.source = mask_source(self.mask_root, check.format)
            coverage = self.segment_choice.cached_coverage()
            if coverage is not None and MaskCache.exists(self.root, coverage):
                # the cache is checked against masks/ once per node: the node's first rank checks
                # before the others build (run.distributed.local_main_first) and stops the job if stale
                self.cache = MaskCache(self.root, coverage, self.source, check_files=first_rank_on_node())
                self.cache_rows = self.cache.rows_for(self.samples.rels())  # the cache's keys: paths relative to train/
                self.cache.forget_keys()
                uncached = int((self.cache_rows < 0).sum())
                print(f"Using the mask cache {self.cache.bin_path}" +
                      (f" ({uncached} images not in it are read from masks/)" if uncached else ""))
            elif coverage is None and os.path.isdir(os.path.join(self.root, "masks_cache")):
                print(f"NOTE: the mask cache in {os.path.join(self.root, 'masks_cache')} holds one segment per image "
                      f"chosen by coverage; {self.segment_choice} chooses otherwise, so masks/ is read")
            self._check_masks(allow_missing_masks, check.missing)
            if mask_size_check is not None:
                self._check_mask_sizes(mask_size_check, skip_bad_samples)

    def describe(self) -> str:
        where = f"{os.path.basename(self.image_root)}/ split" if self.kind == SPLIT else "class folders directly inside"
        return f"{where} ({len(self.samples)} images, {len(self.classes)} classes)"

    def digest(self) -> str:
        return self.samples.digest()

    def name(self, index: int) -> str:
        return os.path.basename(self.samples.rel(index))

    @property
    def rel_paths(self) -> list[str]:
        """Every image's path relative to train/ (built on each call: for start-up and tools)."""
        return self.samples.rels()

    def _uncached(self) -> list[int]:
        return list(range(len(self.samples))) if self.cache_rows is None else np.flatnonzero(self.cache_rows < 0).tolist()

    def _keep(self, keep: list[int]) -> None:
        self.samples = self.samples.select(keep)
        if self.cache_rows is not None:
            self.cache_rows = self.cache_rows[np.asarray(keep, dtype=np.int64)]

    def _leave_out_listed_empty(self) -> None:
        """The original segmae code's emptyfiles.txt names images without masks; like the original,
        those images are not part of the dataset."""
        listed = read_empty_list(self.root)
        if not listed:
            return
        keep = [i for i, rel in enumerate(self.samples.rels()) if os.path.basename(rel) not in listed]
        if len(keep) < len(self.samples):
            print(f"{len(self.samples) - len(keep)} images of {self.image_root} are listed in emptyfiles.txt "
                  f"(no masks) and left out, as the original segmae code does")
            self._keep(keep)
        if not self.samples:
            raise DataError(f"every image under {self.image_root} is listed in emptyfiles.txt: no image has masks")

    def _check_mask_sizes(self, sample: int, skip_bad_samples: bool) -> None:
        """The masks' sizes against the image's header (no pixels decoded) for ``sample``
        images spread over the set (0: every image), so that a mask of another picture is found at
        start-up, not in a loader worker hours later. Cached masks were checked when cached."""
        candidates = self._uncached()
        if sample and len(candidates) > sample:
            candidates = [candidates[int(j)] for j in np.linspace(0, len(candidates) - 1, sample)]
        bad, oriented = [], 0
        counts = (self.source.thresholded.value, self.source.unsorted.value)  # training counts its reads only
        for i in candidates:
            rel, path = self.samples.rel(i), self.samples[i][0]
            if not (os.path.isfile(path) and os.path.isfile(self.source.index_file(rel))):
                continue  # a FIFO or device: read by the loader only, under its read deadline
            try:
                segments = self.source.segments(rel)
                sizes = {seg.size for seg in segments if seg.size is not None}
                if not sizes:
                    continue
                with Image.open(path) as im:
                    orientation = exif_orientation(im)
                    oriented += orientation != 1
                    for size in sizes:  # whichever segment a method chooses
                        mask_fit(size, im.size, orientation, segments.frame)
            except ValueError as e:
                bad.append(f"{self.source.location(rel)}: {e}")
            except (MaskFileError, DataError, *IMAGE_ERRORS) as e:
                bad.append(str(e))
        self.source.thresholded.reset(counts[0])
        self.source.unsorted.reset(counts[1])
        if oriented:
            print(f"{oriented} of the {len(candidates)} images opened for the mask size check have an EXIF orientation "
                  f"other than 1: trained as stored (sideways or upside down), as the reference does; every image is "
                  f"counted in the first epoch")
        if not bad:
            return
        what = f"{len(bad)} of {len(candidates)} images checked at start-up"
        if not skip_bad_samples:
            raise MaskFileError(f"{what} have a mask that does not fit, e.g. {bad[0]}. Regenerate those masks "
                                f"(python tools/check_dataset.py lists all), or pass --skip_bad_samples")
        print(f"WARNING: {what} have a mask that does not fit (skipped when read), e.g. {bad[0]}")

    def _check_masks(self, allow_missing: bool, missing: np.ndarray) -> None:
        """The images without masks (cached ones need none), found by the start-up listing."""
        if self.cache_rows is not None:
            missing = missing[self.cache_rows[missing] < 0]
        if not len(missing):
            return
        missing = missing.tolist()
        first = "\n  ".join(self.source.location(self.samples.rel(i)) for i in missing[:5])
        msg = (f"{len(missing)} of {len(self.samples)} images under {self.image_root} have no mask file "
               f"({self.source.format} layout), for example:\n  {first}")
        if len(missing) == len(self.samples):  # --allow_missing_masks would leave nothing
            raise DataError(f"no image under {self.image_root} has a mask file: looked in {self.source.mask_root} "
                            f"for SAM JSON (<class>/<stem>.json), the original segmae layout (<class>/<stem>/table.txt) "
                            f"and amg.py folders (<class>/<stem>/metadata.csv); e.g. "
                            f"{self.source.location(self.samples.rel(missing[0]))} is missing. Generate masks with "
                            f"tools/generate_masks.py, or check --data_path")
        if not allow_missing:
            raise DataError(msg + "\nGenerate the missing masks, or pass --allow_missing_masks to "
                                  "pretrain without those images.")
        print(f"WARNING: {msg}\nThose images are skipped (--allow_missing_masks).")
        self._keep(np.setdiff1d(np.arange(len(self.samples)), missing))

    def __len__(self) -> int:
        return len(self.samples)
