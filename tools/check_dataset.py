"""Checks a pretraining --data_path before a long run, by the rules training applies: every image
decodes, every image has a mask file that parses with valid RLE (run lengths summing to H x W),
every mask fits its image (same size, a resized copy, or made on the EXIF-rotated picture), no two
images share a mask file; and how many images have an annotation within +-5 points of a coverage
ratio, and how many mask files are empty (accepted). Prints a report; exits 1 if anything is wrong.

    python tools/check_dataset.py --data_path /datasets/imagenet --coverage_ratio 50
"""
from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.generate_masks import list_images  # noqa: E402
from util.sam_masks import (MASK_SUFFIX, MaskFileError, annotation_coverage, check_rle, duplicate_stems,  # noqa: E402
                            exif_orientation, load_annotations, mask_fit, mask_path_for)


def check_one(job: tuple[str, str, str, float, float]) -> dict:
    """One image and its mask file, under the same rules as training (util/sam_masks.py)."""
    rel, image_root, mask_root, coverage, tolerance = job
    result = {"image": rel, "problems": [], "near_coverage": False, "empty": False, "resize": False,
              "rotate": False}
    try:
        with Image.open(os.path.join(image_root, rel)) as im:
            im.load()
            size, orientation = im.size, exif_orientation(im)
    except Exception as e:  # noqa: BLE001
        result["problems"].append(f"image does not decode: {type(e).__name__}: {e}")
        size = None
    mask_path = mask_path_for(mask_root, rel)
    if not os.path.exists(mask_path):
        result["problems"].append(f"no mask file {mask_path}")
        return result
    try:
        anns = load_annotations(mask_path)
        if not anns:  # SAM found nothing: training hides nothing in this image
            result["empty"] = True
            return result
        coverages = []
        for a in anns:
            h, w, _ = check_rle(a["segmentation"])
            coverages.append(annotation_coverage(a))
            if size is not None:
                rule = mask_fit((h, w), size, orientation)
                if rule != "same":
                    result[rule] = True
        result["near_coverage"] = any(abs(c - coverage) <= tolerance for c in coverages)
    except MaskFileError as e:
        result["problems"].append(f"mask file does not parse: {e}")
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        result["problems"].append(f"{mask_path}: {type(e).__name__}: {e}")
    return result


def check(data_path: str, coverage: float = 50.0, tolerance: float = 5.0, workers: int = 1) -> dict:
    image_root, mask_root = os.path.join(data_path, "train"), os.path.join(data_path, "masks")
    report = {"images": 0, "problems": [], "near_coverage": 0, "empty": 0, "resized": 0, "rotated": 0}
    if not os.path.isdir(image_root):
        report["problems"].append(f"{data_path} has no train/ folder")
        return report
    if not os.path.isdir(mask_root):
        report["problems"].append(f"{data_path} has no masks/ folder (segment methods need it)")
    images = list_images(image_root)
    report["problems"] += [f"{a} and {b} share the mask file {os.path.splitext(a)[0] + MASK_SUFFIX}: rename one"
                           for a, b in duplicate_stems(images)]
    jobs = [(rel, image_root, mask_root, coverage, tolerance) for rel in images]
    if workers > 1:
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
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--coverage_ratio", type=float, default=50.0)
    p.add_argument("--tolerance", type=float, default=5.0, help="points around --coverage_ratio")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    report = check(args.data_path, args.coverage_ratio, args.tolerance, args.workers)
    n = max(report["images"], 1)
    print(f"{report['images']} images under {args.data_path}/train")
    print(f"{report['near_coverage']} ({100 * report['near_coverage'] / n:.1f}%) have an annotation within "
          f"+-{args.tolerance:g} points of {args.coverage_ratio:g}% coverage")
    if report["empty"]:
        print(f"{report['empty']} mask files have no annotation (SAM found nothing): those images train with "
              f"nothing hidden (regenerate them with tools/generate_masks.py --redo_empty)")
    if report["resized"] or report["rotated"]:
        print(f"{report['resized']} masks were made at another resolution (resized in training), {report['rotated']} "
              f"on the EXIF-rotated picture (rotated into the image's frame in training)")
    if report["problems"]:
        print(f"{len(report['problems'])} problems:")
        for line in report["problems"][:50]:
            print(f"  {line}")
        if len(report["problems"]) > 50:
            print(f"  ... and {len(report['problems']) - 50} more")
        return 1
    print("no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
