"""Checks a pretraining --data_path before a long run, by the rules training applies: every image
decodes, every image has masks (in any layout training reads: SAM's JSON, the original segmae
table.txt + PNGs, amg.py folders) that parse (valid RLE, readable PNGs), every mask fits its image
(same size, a resized copy, or made on the EXIF-oriented picture), no two images share a mask file,
a mask cache for the coverage ratio is newer than every mask file (training checks a sample); and
how many images have a segment within +-5 points of a coverage ratio, and how many have none
(accepted: nothing is hidden). Prints a report; exits 1 if anything is wrong. Masks of an image
with an EXIF orientation whose frame neither their layout nor their size tells (sam/geometry.py)
are counted as "could not be checked", and the report then does not say "no problems found".
Images with an EXIF orientation other than 1 are counted, with what that means for training and
the command that bakes the rotation in.

    python tools/check_dataset.py --data_path /datasets/imagenet --coverage_ratio 50
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from multiprocessing import Pool

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import relative_paths, scan_image_folder  # noqa: E402
from inputs.images import DataError, image_error  # noqa: E402
from inputs.pretrain import freeze_heap  # noqa: E402
from inputs.roots import image_folder_of  # noqa: E402
from run.flags import coverage_ratio_type, parse_flags  # noqa: E402
from sam.cache import MaskCache  # noqa: E402
from sam.files import MaskFileError, check_rle, duplicate_stems  # noqa: E402
from sam.geometry import IMAGE_ERRORS  # noqa: E402
from sam.geometry import exif_orientation, frame_undetermined, mask_fit  # noqa: E402
from sam.layouts import SOURCES, MaskSource, closest, open_mask_source, png_size  # noqa: E402
from sam.listing import read_empty_list, stem_of  # noqa: E402

_sources: dict[tuple[str, str], MaskSource] = {}  # one reader per worker process


def check_one(job: tuple[str, str, str, str, float, float]) -> dict:
    """One image and its masks, under the same rules as training (sam/files.py, sam/geometry.py)."""
    rel, image_root, mask_root, mask_format, coverage, tolerance = job
    source = _sources.setdefault((mask_root, mask_format), SOURCES[mask_format](mask_root, shared_counters=False))
    result = {"image": rel, "problems": [], "near_coverage": False, "empty": False, "resize": False,
              "rotate": False, "thresholded": False, "undetermined": False, "oriented": False}
    try:
        with Image.open(os.path.join(image_root, rel)) as im:
            im.load()
            size, orientation = im.size, exif_orientation(im)
            result["oriented"] = orientation != 1
    except IMAGE_ERRORS as e:
        result["problems"].append(f"image does not decode: {image_error(os.path.join(image_root, rel), e)}")
        size = None
    except Exception as e:  # noqa: BLE001
        result["problems"].append(f"image does not decode: {type(e).__name__}: {e}")
        size = None
    if not os.path.exists(source.location(rel)):
        result["problems"].append(f"no mask file {source.location(rel)}")
        return result
    try:
        segments = source.segments(rel)
        if not segments:  # SAM found nothing: training hides nothing in this image
            result["empty"] = True
            return result
        for seg in segments:
            if seg.rle is not None:
                h, w, _ = check_rle(seg.rle)
            else:
                h, w = seg.size or png_size(seg.where)
            if size is not None:
                rule = mask_fit((h, w), size, orientation, segments.frame)
                if rule != "same":
                    result["rotate" if rule == "orient" else rule] = True
                result["undetermined"] |= frame_undetermined((h, w), size, orientation, segments.frame)
        chosen = closest(segments, coverage)
        if chosen.rle is None:  # a PNG: decode the one training uses
            before = source.thresholded.value
            chosen.decode()
            result["thresholded"] = source.thresholded.value > before
        result["near_coverage"] = any(abs(seg.coverage - coverage) <= tolerance for seg in segments)
    except MaskFileError as e:
        result["problems"].append(f"mask file does not parse: {e}")
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        result["problems"].append(f"{source.location(rel)}: {type(e).__name__}: {e}")
    return result


def check_val(data_path: str, class_to_idx: dict[str, int], problems: list[str]) -> int | None:
    """val/ as finetuning, linear probing and kNN read it: class folders named as train/'s. Returns
    its image count (None: no val/, which only pretraining can do without)."""
    val_root = os.path.join(data_path, "val")
    if not os.path.isdir(val_root):
        return None
    try:
        return len(scan_image_folder(val_root, class_to_idx).samples)
    except DataError as e:
        problems.append(str(e))
        return 0


def check(data_path: str, coverage: float = 50.0, tolerance: float = 5.0, workers: int = 1,
          mask_format: str = "auto") -> dict:
    mask_root = os.path.join(data_path, "masks")
    report = {"images": 0, "problems": [], "near_coverage": 0, "empty": 0, "resized": 0, "rotated": 0,
              "thresholded": 0, "listed_empty": 0, "format": None, "hidden": 0, "val": None, "cache": None,
              "undetermined": [], "oriented": []}
    try:  # data_path/train, or class folders directly inside (as pretraining reads it)
        image_root, not_classes = image_folder_of(data_path)
    except DataError as e:
        report["problems"].append(str(e))
        return report
    if not os.path.isdir(mask_root):
        report["problems"].append(f"{data_path} has no masks/ folder (segment methods need it)")
    try:
        scan = scan_image_folder(image_root, exclude=not_classes)
    except DataError as e:
        report["problems"].append(str(e))
        return report
    report["hidden"] = len(scan.hidden)
    report["problems"] += [f"class folder {os.path.join(image_root, c)} holds no image" for c in scan.empty_classes]
    report["val"] = check_val(data_path, scan.class_to_idx, report["problems"])
    images = relative_paths(scan)
    listed = read_empty_list(data_path)
    kept = [rel for rel in images if os.path.basename(rel) not in listed]
    report["listed_empty"] = len(images) - len(kept)
    images = kept
    try:
        source = open_mask_source(mask_root, {stem_of(r) for r in images}, mask_format)
    except MaskFileError as e:
        report["problems"].append(str(e))
        return report
    report["format"] = source.format
    if MaskCache.exists(data_path, coverage):
        try:
            report["cache"] = MaskCache(data_path, coverage, source, every_file=True).bin_path
        except MaskFileError as e:
            report["problems"].append(str(e))
    report["problems"] += [f"{a} and {b} share the mask file {os.path.relpath(source.location(a), mask_root)}: "
                           f"rename one" for a, b in duplicate_stems(images)]
    jobs = [(rel, image_root, mask_root, report["format"], coverage, tolerance) for rel in images]
    if workers > 1:
        freeze_heap(workers)
        with Pool(workers) as pool:
            results = pool.map(check_one, jobs, chunksize=64)
    else:
        results = [check_one(j) for j in jobs]
    report["images"] = len(results)
    for r in results:
        report["problems"] += [f"{r['image']}: {p}" for p in r["problems"]]
        report["near_coverage"] += r["near_coverage"]
        report["empty"] += r["empty"]
        report["resized"] += r["resize"]
        report["rotated"] += r["rotate"]
        report["thresholded"] += r["thresholded"]
        if r["undetermined"]:
            report["undetermined"].append(r["image"])
        if r["oriented"]:
            report["oriented"].append(r["image"])
    return report


def oriented_images_note(count: int, example: str, image_root: str) -> str:
    """What images with an EXIF orientation other than 1 mean, and how to train them upright."""
    return (f"{count} images have an EXIF orientation other than 1 (e.g. {example}; phone photos): training uses "
            f"their stored pixels, as the reference MAE does, so they train as stored, sideways or upside down "
            f"(their masks are matched to those pixels). To train them upright, bake the rotation into the files "
            f"(JPEGs, re-encoded at quality 95), then regenerate their masks:\n  {EXIF_TRANSPOSE_COMMAND} "
            f"{image_root}")


# every JPEG under a folder with an EXIF orientation other than 1, rotated into its pixels (the tag removed)
EXIF_TRANSPOSE_COMMAND = (
    "python -c \"import glob, sys; from PIL import Image, ImageOps; "
    "[ImageOps.exif_transpose(im).save(p, quality=95) for p in glob.glob(sys.argv[1] + '/**/*', recursive=True) "
    "if p.lower().endswith(('.jpg', '.jpeg')) for im in [Image.open(p)] if im.getexif().get(0x0112, 1) != 1]\"")


def tolerance_type(value: str) -> float:
    """Points around --coverage_ratio: a finite number >= 0 (nan would count no image as near, and
    report no problem)."""
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of points >= 0, got {value}")
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--coverage_ratio", type=coverage_ratio_type, default=50.0)
    p.add_argument("--tolerance", type=tolerance_type, default=5.0, help="points around --coverage_ratio")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mask_format", default="auto", choices=("auto",) + tuple(SOURCES),
                   help="layout of masks/ (default: detected)")
    args = parse_flags(p, argv)
    report = check(args.data_path, args.coverage_ratio, args.tolerance, args.workers, args.mask_format)
    n = max(report["images"], 1)
    print(f"{report['images']} images under {args.data_path}/train" +
          (f", masks in the {report['format']} layout" if report["format"] else ""))
    if report["hidden"]:
        print(f"{report['hidden']} hidden files or folders (names starting with a dot, e.g. macOS ._ files) "
              f"are skipped, as training skips them")
    if report["val"] is None:
        print(f"{args.data_path} has no val/ folder: pretraining does not need one; finetuning, linear probing "
              f"and kNN do")
    elif report["val"]:
        print(f"{report['val']} images under {args.data_path}/val, in train/'s classes")
    if report["cache"]:
        print(f"the mask cache {report['cache']} is newer than every mask file")
    if report["listed_empty"]:
        print(f"{report['listed_empty']} images are listed in emptyfiles.txt (no masks): training leaves them out")
    if report["thresholded"]:
        print(f"{report['thresholded']} chosen mask PNGs are not strictly 0/255: training thresholds them at 128")
    print(f"{report['near_coverage']} ({100 * report['near_coverage'] / n:.1f}%) have an annotation within "
          f"+-{args.tolerance:g} points of {args.coverage_ratio:g}% coverage")
    if report["empty"]:
        print(f"{report['empty']} images have no segment (SAM found nothing): those images train with "
              f"nothing hidden (regenerate them with tools/generate_masks.py --redo_empty)")
    if report["resized"] or report["rotated"]:
        print(f"{report['resized']} masks were made at another resolution (resized in training), {report['rotated']} "
              f"on the displayed, EXIF-oriented picture (mapped into the stored pixels' frame in training)")
    if report["oriented"]:
        print(oriented_images_note(len(report["oriented"]), report["oriented"][0],
                                   shlex.quote(os.path.join(args.data_path, "train"))))
    undetermined = report["undetermined"]
    if undetermined:
        print(f"{len(undetermined)} images have an EXIF orientation and masks in a layout that does not record which "
              f"picture they were made on, and whose size does not tell (e.g. {undetermined[0]}): training takes them "
              f"as made on the stored pixels, as tools/generate_masks.py makes them. If they were made on the "
              f"displayed picture (OpenCV, e.g. SAM's amg.py), regenerate them with tools/generate_masks.py, or "
              f"record \"frame\": \"displayed\" in each JSON file's \"generator\" entry")
    if report["problems"]:
        print(f"{len(report['problems'])} problems:")
        for line in report["problems"][:50]:
            print(f"  {line}")
        if len(report["problems"]) > 50:
            print(f"  ... and {len(report['problems']) - 50} more")
        return 1
    if undetermined:
        print(f"no other problems found; {len(undetermined)} images' masks could not be checked (see above)")
        return 0
    print("no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
