"""Start-up cost of a pretraining dataset in each mask layout: the seconds from nothing to a built
SegmentMaskImageFolder (class scan, layout detection, missing-mask check) on a synthetic tree of
--images images in --classes class folders, and the ratio to the JSON layout. Layouts are timed
interleaved, --repeats times each (median reported); images and masks are tiny but real files.

    python perf/dataset_startup.py --images 200000 --root /tmp/startup_tree
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.pretrain import SegmentMaskImageFolder  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from sam.files import MASK_SUFFIX  # noqa: E402
from sam.listing import MASK_FORMATS  # noqa: E402
from tools.make_toy_data import annotation, write_amg_masks, write_segmae_masks  # noqa: E402


def tiny_sample() -> tuple[bytes, np.ndarray, dict]:
    """An 8x8 JPEG's bytes, a segment of its top half and that segment as SAM's annotation."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="JPEG")
    seg = np.zeros((8, 8), np.uint8)
    seg[:4] = 1
    return buf.getvalue(), seg, annotation(seg, 0, np.random.RandomState(0))


def build_tree(root: str, images: int, classes: int) -> None:
    """train/<class>/<i>.JPEG and masks_<layout>/ for each layout (the same segment everywhere).
    Kept between runs: a tree that is already complete is not written again."""
    done = os.path.join(root, f".complete-{images}-{classes}")
    if os.path.exists(done):
        return
    jpeg, seg, ann = tiny_sample()
    json_bytes = json.dumps({"image": {}, "annotations": [ann]}).encode()
    per_class = -(-images // classes)
    for c in range(classes):
        name = f"n{c:08d}"
        for sub in ["train"] + [f"masks_{f}" for f in MASK_FORMATS]:
            os.makedirs(os.path.join(root, sub, name), exist_ok=True)
        for i in range(min(per_class, images - c * per_class)):
            stem = f"{name}_{i}"
            with open(os.path.join(root, "train", name, stem + ".JPEG"), "wb") as f:
                f.write(jpeg)
            with open(os.path.join(root, "masks_json", name, stem + MASK_SUFFIX), "wb") as f:
                f.write(json_bytes)
            write_segmae_masks(os.path.join(root, "masks_segmae", name, stem), [seg])
            write_amg_masks(os.path.join(root, "masks_amg", name, stem), [ann], [seg])
        if c % 100 == 0:
            print(f"  tree: {c}/{classes} class folders", file=sys.stderr, flush=True)
    open(done, "w").close()


def time_startup(root: str, layout: str) -> float:
    link = os.path.join(root, "masks")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(f"masks_{layout}", link)
    start = time.perf_counter()
    folder = SegmentMaskImageFolder(root, with_masks=True, coverage_ratio=50.0)
    seconds = time.perf_counter() - start
    assert folder.source.format == layout
    return seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--root", default="/tmp/mask_layout_startup", help="where the synthetic tree is written (kept)")
    p.add_argument("--repeats", type=int, default=3)
    args = parse_flags(p, argv)
    start = time.time()
    build_tree(args.root, args.images, args.classes)
    print(f"tree of {args.images} images ready in {time.time() - start:.0f}s", file=sys.stderr)
    times: dict[str, list[float]] = {f: [] for f in MASK_FORMATS}
    for _ in range(args.repeats):
        for layout in MASK_FORMATS:
            times[layout].append(time_startup(args.root, layout))
    medians = {f: statistics.median(t) for f, t in times.items()}
    print(f"{'layout':<8} {'start-up s':>11} {'vs json':>8}   ({args.images} images, {args.classes} classes, "
          f"median of {args.repeats})")
    for layout, seconds in medians.items():
        print(f"{layout:<8} {seconds:>11.2f} {seconds / medians['json']:>7.2f}x")
    return medians


if __name__ == "__main__":
    main()
