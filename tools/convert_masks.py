"""Converts a data root's masks from any layout training reads (the original segmae table.txt +
PNGs, segment-anything's amg.py folders, SAM's JSON) into SAM's JSON layout, or straight into the
compact mask cache. The chosen segment for any --coverage_ratio stays exactly what it was (files
from the segmae layout keep its recorded coverages and its tie rule).

    python tools/convert_masks.py --data_path DATA                 # -> DATA/masks_json/<class>/<stem>.json
    python tools/convert_masks.py --data_path DATA --to cache --coverage_ratio 50   # -> DATA/masks_cache/

Resumable (a file newer than its source is kept), parallel over --workers processes, every file
written atomically. Images listed in emptyfiles.txt are left out (the list keeps working with the
JSON layout). Masks already in SAM's JSON layout need nothing: it says so and writes nothing.
Exits 1 if any image could not be converted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import list_images  # noqa: E402
from run.files import remove_stale_temp_files  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from run.setup import run_tool  # noqa: E402
from sam.cache import build_mask_cache  # noqa: E402
from sam.files import MASK_SUFFIX, MaskFileError, encode_segmentation, write_mask_file  # noqa: E402
from sam.layouts import SOURCES, MaskSource, open_mask_source  # noqa: E402
from sam.listing import read_empty_list, stem_of  # noqa: E402
from util.misc import UserError  # noqa: E402

_sources: dict[tuple[str, str], MaskSource] = {}  # one reader per worker process


def converted_annotations(source: MaskSource, rel: str) -> tuple[list[dict], tuple[int, int] | None]:
    """The image's segments as SAM annotations (COCO RLE), and the masks' size (H, W)."""
    anns, size = [], None
    for seg in source.segments(rel):
        mask = seg.decode()
        size = mask.shape
        ann = {"segmentation": encode_segmentation(mask), "area": int(mask.sum())}
        ann.update(seg.fields)  # amg.py's area, bbox, point, scores, crop box
        if source.format == "segmae":
            ann["coverage"] = seg.coverage  # as the original recorded it: the same choice, exactly
        anns.append(ann)
    return anns, size


def convert_one(job: tuple[str, str, str, str]) -> tuple[str, str]:
    """('converted' | 'done' | 'empty' | 'error', message) for one image."""
    rel, mask_root, mask_format, out_root = job
    source = _sources.setdefault((mask_root, mask_format), SOURCES[mask_format](mask_root, shared_counters=False))
    out = os.path.join(out_root, stem_of(rel) + MASK_SUFFIX)
    try:
        src_mtime = os.stat(source.index_file(rel)).st_mtime_ns
    except OSError:
        return "error", f"{rel}: no masks ({source.index_file(rel)} is missing)"
    try:
        if os.stat(out).st_mtime_ns >= src_mtime:
            return "done", ""
    except OSError:
        pass
    try:
        anns, size = converted_annotations(source, rel)
        info = {"file_name": os.path.basename(rel)}
        if size is not None:
            info.update(height=int(size[0]), width=int(size[1]))
        # the original's tie rule travels with a file from its layout
        write_mask_file(out, anns, image_info=info,
                        generator={"converted_from": source.format, "source": source.location(rel)},
                        extra={"choice": "segmae"} if source.format == "segmae" else None)
    except (MaskFileError, OSError) as e:
        return "error", f"{rel}: {e}"
    return ("converted" if anns else "empty"), ""


def convert(data_path: str, out: str | None = None, mask_format: str = "auto", workers: int = 1,
            to: str = "json", coverage_ratio: float = 50.0) -> dict:
    image_root, mask_root = os.path.join(data_path, "train"), os.path.join(data_path, "masks")
    if not os.path.isdir(image_root) or not os.path.isdir(mask_root):
        raise UserError(f"--data_path {data_path} needs train/ and masks/")
    images = list_images(image_root)
    listed = read_empty_list(data_path)
    kept = [rel for rel in images if os.path.basename(rel) not in listed]
    summary = {"images": len(kept), "listed_empty": len(images) - len(kept), "converted": 0, "done": 0,
               "empty": 0, "error": 0, "errors": []}
    source = open_mask_source(mask_root, {stem_of(r) for r in kept}, mask_format, shared_counters=False)
    summary["format"] = source.format
    if to == "json" and source.format == "json":  # training reads it as it is: a copy would only swap names
        summary["nothing_to_convert"] = True
        return summary
    if to == "cache":
        start = time.time()
        summary["cache"] = build_mask_cache(data_path, kept, coverage_ratio, source.format)
        summary["converted"] = len(kept)
        print(f"{len(kept)} images ({source.format} layout) -> {summary['cache']} in {time.time() - start:.1f}s")
        return summary
    out = out or os.path.join(data_path, "masks_json")
    if os.path.abspath(out) == os.path.abspath(mask_root):
        raise UserError(f"--out {out} is the masks/ folder being read: write elsewhere, then swap the folders")
    _remove_stale_temp_files(out)
    jobs = [(rel, mask_root, source.format, out) for rel in kept]
    start, last_print = time.time(), 0.0
    pool = Pool(workers) if workers > 1 else None
    results = pool.imap_unordered(convert_one, jobs, chunksize=16) if pool else map(convert_one, jobs)
    try:
        for n, (status, message) in enumerate(results, 1):
            summary[status] += 1
            if message:
                summary["errors"].append(message)
            now = time.time()
            if now - last_print > 2 or n == len(jobs):
                rate = n / max(now - start, 1e-9)
                print(f"\r{n}/{len(jobs)} images, {rate:.0f} img/s, ETA {(len(jobs) - n) / max(rate, 1e-9):.0f}s",
                      end="", file=sys.stderr, flush=True)
                last_print = now
    finally:
        if pool:
            pool.close()
            pool.join()
    print(file=sys.stderr)
    summary["out"] = out
    return summary


def _remove_stale_temp_files(out: str) -> None:
    """Temp files of a killed earlier run, in every folder of out (atomic writes leave nothing else)."""
    for dirpath, _, _ in os.walk(out):
        remove_stale_temp_files(dirpath)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="a root with train/ and masks/")
    p.add_argument("--from", dest="mask_format", default="auto", choices=("auto",) + tuple(SOURCES),
                   help="layout of masks/ (default: detected)")
    p.add_argument("--to", default="json", choices=["json", "cache"],
                   help="json: SAM's JSON layout in --out; cache: the compact cache for --coverage_ratio")
    p.add_argument("--out", default=None, help="json: output folder (default: <data_path>/masks_json)")
    p.add_argument("--coverage_ratio", type=float, default=50.0, help="--to cache: the coverage it is built for")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parse_flags(p, argv)
    summary = convert(args.data_path, args.out, args.mask_format, args.workers, args.to, args.coverage_ratio)
    if summary.get("nothing_to_convert"):
        print(f"{summary['images']} images: {os.path.join(args.data_path, 'masks')} is already SAM's JSON layout, "
              f"nothing to convert (training reads it as it is; --to cache builds the compact cache)")
    elif args.to == "json":
        print(f"{summary['images']} images ({summary['format']} layout): {summary['converted']} converted, "
              f"{summary['done']} already done, {summary['empty']} without segments, {summary['error']} errors"
              + (f"; {summary['listed_empty']} listed in emptyfiles.txt left out" if summary["listed_empty"] else ""))
        for line in summary["errors"][:20]:
            print(f"  {line}")
        if summary["error"]:
            raise SystemExit(1)
        masks = os.path.join(args.data_path, "masks")
        backup = f"{masks}_{summary['format']}"
        while os.path.exists(backup) or os.path.abspath(backup) == os.path.abspath(summary["out"]):
            backup += "_original"  # not the converted folder itself (an --out named like the backup)
        print(f"To train on them: {shlex.join(['mv', masks, backup])} && {shlex.join(['mv', summary['out'], masks])}")
    return summary


if __name__ == "__main__":
    run_tool(main)
