"""Writes SAM-style mask files for an ImageFolder tree: <data_path>/masks/<class>/<stem>.json.

    # Segment-Anything (pip install segment-anything; a checkpoint from its model zoo)
    python tools/generate_masks.py --data_path /datasets/imagenet --backend sam \\
        --sam_checkpoint sam_vit_h_4b8939.pth --sam_model vit_h
    torchrun --nproc_per_node 8 tools/generate_masks.py ... --backend sam     # shards the file list
    # without SAM: superpixels (scikit-image), overlapping segments at several scales
    python tools/generate_masks.py --data_path data/mydataset --backend superpixels --workers 16

Resumable: images whose mask file exists and parses are skipped. Every file is written atomically,
in SA-1B's {"image", "annotations"} form with COCO RLE segmentations. Ends with a summary: images,
masks per image and a coverage histogram.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.sam_masks import (annotation_coverage, encode_segmentation, load_annotations, mask_path_for,  # noqa: E402
                            write_mask_file)



def list_images(image_root: str) -> list[str]:
    """Relative paths of every image under image_root, sorted."""
    found = []
    for dirpath, _, files in os.walk(image_root, followlinks=True):
        for f in files:
            if f.lower().endswith(IMG_EXTENSIONS):  # the extensions the training datasets read
                found.append(os.path.relpath(os.path.join(dirpath, f), image_root))
    return sorted(found)


def mask_file_ok(path: str) -> bool:
    try:
        load_annotations(path)
        return True
    except Exception:  # noqa: BLE001 - any failure means "generate it again"
        return False


def annotations_from_masks(masks: Iterable[np.ndarray], scores: Iterable[float] | None = None) -> list[dict]:
    """Binary masks -> SAM-style annotations (segmentation RLE, area, bbox, predicted_iou)."""
    out = []
    scores = list(scores) if scores is not None else None
    for k, m in enumerate(masks):
        m = np.asarray(m, dtype=np.uint8)
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        ann = {"segmentation": encode_segmentation(m), "area": int(m.sum()),
               "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]}
        if scores is not None:
            ann["predicted_iou"] = float(scores[k])
        out.append(ann)
    return out


# ------------------------------------------------------------------------------------------------
# backends: a callable (H, W, 3) uint8 image -> list of annotations

def superpixel_segments(img: np.ndarray, scales=(100, 300, 1000), n_slic=(8, 32)) -> list[dict]:
    """Felzenszwalb at several scales and SLIC at several sizes: overlapping segments of varied
    areas, from small parts to large regions, without SAM."""
    from skimage.segmentation import felzenszwalb, slic
    masks = []
    for scale in scales:
        labels = felzenszwalb(img, scale=scale, sigma=0.8, min_size=max(20, img.shape[0] * img.shape[1] // 2000))
        masks += [labels == k for k in np.unique(labels)]
    for n in n_slic:
        labels = slic(img, n_segments=n, compactness=10, start_label=0)
        masks += [labels == k for k in np.unique(labels)]
    return annotations_from_masks(masks)


def superpixel_backend() -> Callable:
    return superpixel_segments


class SamBackend:
    """Segment-Anything's automatic mask generator (``segment_anything`` package); ``generator``
    may be given directly (tests inject a stand-in with the same ``generate`` method)."""

    def __init__(self, checkpoint: str = "", model_type: str = "vit_h", device: str = "cuda",
                 points_per_side: int = 32, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 generator=None):
        if generator is None:
            try:
                from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
            except ImportError:
                raise SystemExit("the sam backend needs the segment-anything package: pip install "
                                 "segment-anything (or use --backend superpixels)") from None
            if not os.path.isfile(checkpoint):
                raise SystemExit(f"--sam_checkpoint {checkpoint!r} not found: download one from the "
                                 f"segment-anything model zoo")
            sam = sam_model_registry[model_type](checkpoint=checkpoint).to(device)
            generator = SamAutomaticMaskGenerator(sam, points_per_side=points_per_side,
                                                  pred_iou_thresh=pred_iou_thresh,
                                                  stability_score_thresh=stability_score_thresh,
                                                  output_mode="coco_rle")
        self.generator = generator

    def __call__(self, img: np.ndarray) -> list[dict]:
        records = self.generator.generate(img)
        anns = []
        for r in records:
            seg = r["segmentation"]
            if isinstance(seg, np.ndarray):  # binary_mask output mode
                seg = encode_segmentation(seg)
            ann = {"segmentation": seg, "area": int(r["area"])}
            for key in ("bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"):
                if key in r:
                    ann[key] = r[key]
            anns.append(ann)
        return anns


# ------------------------------------------------------------------------------------------------

def process_one(job: tuple[str, str, str], backend: Callable) -> tuple[str, int, list[float], str | None]:
    """(relative path, number of masks, coverages, error) for one image."""
    rel, image_root, mask_root = job
    try:
        with Image.open(os.path.join(image_root, rel)) as im:
            img = np.asarray(im.convert("RGB"))
        anns = backend(img)
        h, w = img.shape[:2]
        write_mask_file(mask_path_for(mask_root, rel), anns,
                        {"file_name": os.path.basename(rel), "height": h, "width": w})
        return rel, len(anns), [annotation_coverage(a) for a in anns], None
    except Exception as e:  # noqa: BLE001 - reported per image, the run goes on
        return rel, 0, [], f"{type(e).__name__}: {e}"


_WORKER_BACKEND: Callable | None = None


def _init_worker(backend_factory: Callable) -> None:
    global _WORKER_BACKEND
    _WORKER_BACKEND = backend_factory()


def _work(job):
    return process_one(job, _WORKER_BACKEND)


def generate(data_path: str, backend_factory: Callable, split: str = "train", workers: int = 1,
             rank: int = 0, world_size: int = 1, log_every: float = 2.0) -> dict:
    """Generates the missing mask files of this rank's share of the images; returns a summary."""
    image_root = os.path.join(data_path, split)
    mask_root = os.path.join(data_path, "masks")
    if not os.path.isdir(image_root):
        raise SystemExit(f"--data_path {data_path} has no {split}/ folder (expected {split}/<class>/<image>)")
    images = list_images(image_root)[rank::world_size]
    todo = [rel for rel in images if not mask_file_ok(mask_path_for(mask_root, rel))]
    print(f"{len(images)} images, {len(images) - len(todo)} already have a mask file, {len(todo)} to do")
    jobs = [(rel, image_root, mask_root) for rel in todo]
    counts, coverages, errors = [], [], []
    start = last = time.time()
    if workers > 1 and jobs:
        pool = Pool(workers, initializer=_init_worker, initargs=(backend_factory,))
        results = pool.imap_unordered(_work, jobs, chunksize=4)
    else:
        pool, backend = None, backend_factory()
        results = (process_one(job, backend) for job in jobs)
    for i, (rel, n, cov, err) in enumerate(results, 1):
        if err:
            errors.append(f"{rel}: {err}")
        else:
            counts.append(n)
            coverages += cov
        now = time.time()
        if now - last > log_every or i == len(jobs):
            speed = i / max(now - start, 1e-9)
            eta = (len(jobs) - i) / max(speed, 1e-9)
            print(f"\r[{i}/{len(jobs)}] {speed:.2f} images/s, ETA {eta / 60:.1f} min", end="", flush=True)
            last = now
    if pool is not None:
        pool.close()
        pool.join()
    print()
    hist, edges = np.histogram(coverages, bins=[0, 1, 5, 10, 25, 50, 75, 100.0001])
    summary = {"images": len(images), "generated": len(counts), "skipped_existing": len(images) - len(todo),
               "failed": errors, "masks_per_image": float(np.mean(counts)) if counts else 0.0,
               "coverage_histogram": {f"{edges[k]:g}-{min(edges[k + 1], 100):g}%": int(hist[k]) for k in range(len(hist))},
               "seconds": round(time.time() - start, 1)}
    print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--backend", default=None, choices=["sam", "superpixels"],
                   help="default: sam if segment-anything is installed and --sam_checkpoint given, else superpixels")
    p.add_argument("--sam_checkpoint", default="")
    p.add_argument("--sam_model", default="vit_h", choices=["vit_h", "vit_l", "vit_b"])
    p.add_argument("--points_per_side", type=int, default=32)
    p.add_argument("--pred_iou_thresh", type=float, default=0.88)
    p.add_argument("--stability_score_thresh", type=float, default=0.95)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU processes (superpixels)")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    backend = args.backend
    if backend is None:
        try:
            import segment_anything  # noqa: F401
            backend = "sam" if args.sam_checkpoint else "superpixels"
        except ImportError:
            backend = "superpixels"
    if backend == "sam":
        import functools
        import torch
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        factory = functools.partial(SamBackend, args.sam_checkpoint, args.sam_model, device, args.points_per_side,
                                    args.pred_iou_thresh, args.stability_score_thresh)
        workers = 1  # the GPU does the work
    else:
        factory, workers = superpixel_backend, args.workers
    print(f"backend {backend}, rank {rank}/{world}")
    return generate(args.data_path, factory, args.split, workers, rank, world)


if __name__ == "__main__":
    main()
