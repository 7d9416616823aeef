"""Writes the compact mask cache of a dataset for one --coverage_ratio: the chosen segment of every
image (from masks/ in any layout: SAM's JSON, segmae table.txt + PNGs, amg.py folders), so that
pretraining reads one short RLE per sample instead of parsing a mask file or decoding PNGs.
Pretraining with the same --coverage_ratio picks it up by itself. Rebuild it after changing masks.

    python tools/build_mask_cache.py --data_path /datasets/imagenet --coverage_ratio 50 --workers 16

It runs in --workers processes and shows images/s and the ETA. Killed, it resumes when run again
with the same arguments: finished parts (2048 images each) whose mask files are unchanged are kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import relative_paths, scan_image_folder  # noqa: E402
from inputs.roots import image_folder_of  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from run.setup import run_tool  # noqa: E402
from sam.cache import build_mask_cache  # noqa: E402
from sam.listing import MASK_FORMATS  # noqa: E402


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", nargs="+", required=True)
    p.add_argument("--coverage_ratio", type=float, default=50.0)
    p.add_argument("--mask_format", default="auto", choices=("auto",) + MASK_FORMATS,
                   help="layout of masks/ (default: detected): json, segmae (table.txt + PNGs) or amg (amg.py folders)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that read mask files in parallel (default: min(8, CPUs))")
    p.add_argument("--progress_every", type=float, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal")
    args = parse_flags(p, argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    written = []
    for root in args.data_path:
        start = time.time()
        folder, not_classes = image_folder_of(root)  # root/train, or class folders directly inside
        images = relative_paths(scan_image_folder(folder, exclude=not_classes))
        path = build_mask_cache(root, images, args.coverage_ratio, args.mask_format, args.workers,
                                args.progress_every)
        size = os.path.getsize(path)
        print(f"{root}: {len(images)} images, {size / 2 ** 20:.1f} MB ({size / max(len(images), 1):.0f} B/image) "
              f"in {path}, {time.time() - start:.1f}s with {args.workers} worker(s)")
        written.append(path)
    return written


if __name__ == "__main__":
    run_tool(main)
