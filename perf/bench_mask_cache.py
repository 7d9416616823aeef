"""Speed of tools/build_mask_cache.py on real-size SAM files, and its projection to ImageNet.

Writes a synthetic tree of --images JPEGs (500x375, ImageNet's typical size) with one SAM JSON each
holding --annotations masks with ragged edges, in the form SAM's automatic mask generator writes
(coco_rle, bbox, predicted_iou, point_coords, stability_score, crop_box: ~100 KB per file), then
builds the mask cache with each --workers count, from a cold start (no parts kept), and reports
images/s and the projected time for 1,281,167 images:

    python perf/bench_mask_cache.py --images 4000 --workers 1 2 --root /tmp/bench_mask_cache
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import list_images  # noqa: E402
from run.files import atomic_write_json  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from sam.cache import build_mask_cache  # noqa: E402

IMAGENET = 1_281_167
W, H = 500, 375


def ragged_masks(rng: np.random.Generator, count: int) -> list[dict]:
    """SAM-like annotations: blobs of random size whose outline wobbles, so their RLE is as long as
    a real segment's (hundreds of runs)."""
    from pycocotools import mask as mask_utils
    yy, xx = np.mgrid[0:H, 0:W]
    annotations = []
    for _ in range(count):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        radius = rng.uniform(10, 200)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.2 * np.sin(angle * rng.integers(5, 40) + rng.uniform(0, 6)) * np.sin(angle * rng.integers(2, 9))
        mask = (np.hypot(yy - cy, xx - cx) < radius * wobble).astype(np.uint8)
        if not mask.any():
            mask[int(cy) % H, int(cx) % W] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append({"segmentation": rle, "area": int(mask.sum()), "bbox": [x0, y0, bw, bh],
                            "predicted_iou": float(rng.uniform(0.85, 1.0)), "point_coords": [[cx, cy]],
                            "stability_score": float(rng.uniform(0.9, 1.0)), "crop_box": [0, 0, W, H]})
    return annotations


def make_tree(root: str, images: int, annotations: int, classes: int = 100) -> float:
    """The synthetic tree (kept between runs); returns the mean mask file size in bytes."""
    from PIL import Image
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        shutil.rmtree(root, ignore_errors=True)
        rng = np.random.default_rng(0)
        pool = ragged_masks(rng, min(400, 4 * annotations))  # a pool: making 100 masks per image would dominate
        jpeg = os.path.join(root, "sample.jpg")
        os.makedirs(root)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(jpeg, quality=30)
        for i in range(images):
            cls = f"n{i % classes:08d}"
            for top in ("train", "masks"):
                os.makedirs(os.path.join(root, top, cls), exist_ok=True)
            os.link(jpeg, os.path.join(root, "train", cls, f"img_{i:07d}.JPEG"))
            chosen = [pool[j] for j in rng.choice(len(pool), annotations, replace=False)]
            with open(os.path.join(root, "masks", cls, f"img_{i:07d}.json"), "w") as f:
                json.dump({"image": {"width": W, "height": H, "file_name": f"img_{i:07d}.JPEG"},
                           "annotations": chosen}, f)
        open(done, "w").close()
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(root, "masks")) for n in names]
    return sum(os.path.getsize(f) for f in files) / max(len(files), 1)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--annotations", type=int, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--root", default="/tmp/bench_mask_cache")
    p.add_argument("--json", default="", help="also write the rows here")
    args = parse_flags(p, argv)
    mean_bytes = make_tree(args.root, args.images, args.annotations)
    images = list_images(os.path.join(args.root, "train"))
    print(f"{len(images)} images, mask files {mean_bytes / 1e3:.0f} KB on average, {args.annotations} masks each")
    rows = []
    for workers in args.workers:
        shutil.rmtree(os.path.join(args.root, "masks_cache"), ignore_errors=True)
        start = time.time()
        build_mask_cache(args.root, images, 50.0, workers=workers, progress_every=1e9)
        seconds = time.time() - start
        rate = len(images) / seconds
        rows.append({"workers": workers, "images": len(images), "mask_kb": round(mean_bytes / 1e3, 1),
                     "seconds": round(seconds, 2), "images_per_s": round(rate, 1),
                     "imagenet_hours": round(IMAGENET / rate / 3600, 2)})
        print(f"workers {workers}: {seconds:.1f} s, {rate:.0f} images/s, 1.28M images in "
              f"{IMAGENET / rate / 3600:.2f} h")
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    return rows


if __name__ == "__main__":
    main()
