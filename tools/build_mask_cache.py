"""Writes the compact mask cache of a dataset for one --coverage_ratio: the chosen segment of every
mask file, so that pretraining reads one short RLE per sample instead of parsing a SAM JSON file.
Pretraining with the same --coverage_ratio picks it up by itself. Rebuild it after changing masks.

    python tools/build_mask_cache.py --data_path /datasets/imagenet --coverage_ratio 50
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.generate_masks import list_images  # noqa: E402
from util.sam_masks import build_mask_cache  # noqa: E402


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", nargs="+", required=True)
    p.add_argument("--coverage_ratio", type=float, default=50.0)
    args = p.parse_args(argv)
    written = []
    for root in args.data_path:
        start = time.time()
        images = list_images(os.path.join(root, "train"))
        path = build_mask_cache(root, images, args.coverage_ratio)
        size = os.path.getsize(path)
        print(f"{root}: {len(images)} images, {size / 2 ** 20:.1f} MB ({size / max(len(images), 1):.0f} B/image) "
              f"in {path}, {time.time() - start:.1f}s")
        written.append(path)
    return written


if __name__ == "__main__":
    main()
