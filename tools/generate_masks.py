r"""Writes SAM-style mask files for an ImageFolder tree: <data_path>/masks/<class>/<stem>.json.

    # Segment-Anything (pip install segment-anything; a checkpoint from its model zoo)
    python tools/generate_masks.py --data_path /datasets/imagenet --backend sam \
        --sam_checkpoint sam_vit_h_4b8939.pth --sam_model vit_h
    # SAM 2 (pip install sam2; a checkpoint such as sam2.1_hiera_large.pt)
    python tools/generate_masks.py --data_path DATA --backend sam2 --sam_checkpoint sam2.1_hiera_large.pt \
        --sam_model hiera_large --amp bf16
    torchrun --nproc_per_node 8 tools/generate_masks.py ... --backend sam     # shards the file list
    # without SAM: superpixels (scikit-image), overlapping segments at several scales
    python tools/generate_masks.py --data_path data/mydataset --backend superpixels --workers 16

Images are read as training reads them (Pillow, EXIF orientation not applied, 16-bit scaled to 8
bit), so every mask is on its image's pixel grid. Resumable: images whose mask file exists and
parses and records this run's generator and settings are skipped (--redo_empty also redoes files
in which nothing was found; files of another generator are made again unless --keep_other_generators). Every file is
written atomically in SA-1B's layout ({"image": {image_id, width, height, file_name},
"annotations": [{bbox, area, segmentation, predicted_iou, point_coords, crop_box, id,
stability_score}]}, COCO RLE) plus a "generator" entry with the backend and every setting used,
so a mask set can be reproduced. Ends with a summary; the exit status is 1 if any image failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from typing import Callable, Iterable, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run.claims as claims  # noqa: E402
from inputs.folders import list_images  # noqa: E402 (its earlier home was this module)
from inputs.images import load_rgb  # noqa: E402
from inputs.pretrain import freeze_heap  # noqa: E402
from run.files import file_digest  # noqa: E402
from run.flags import add_local_rank_arg, parse_flags  # noqa: E402
from sam.files import annotation_coverage, duplicate_stems, encode_segmentation, mask_path_for, write_mask_file
from sam.layouts import RANDOM_WEIGHTS  # noqa: E402

# SA-1B's key order of an annotation; keys a backend does not give are left out
SA1B_ANNOTATION_KEYS = ("bbox", "area", "segmentation", "predicted_iou", "point_coords", "crop_box", "id",
                        "stability_score")
SAM_MODELS = ("vit_h", "vit_l", "vit_b")
OFFICIAL_WEIGHTS = {"sam": "sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth",
                    "sam2": "sam2.1_hiera_large.pt, _base_plus.pt, _small.pt or _tiny.pt"}
SAM2_MODELS = {"hiera_tiny": "t", "hiera_small": "s", "hiera_base_plus": "b+", "hiera_large": "l"}


def mask_file_state(path: str, expected: dict | None = None) -> str:
    """'ok', 'empty' (parses, no annotation), 'redo' (missing or broken) or 'other': made by another
    generator or other settings than ``expected`` (what this run would record). A file that records
    no generator (converted from another layout) is taken as it is."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
        annotations = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(annotations, list):
            return "redo"
        recorded = data.get("generator") if isinstance(data, dict) else None
        if expected is not None and recorded is not None and recorded != expected:
            return "other"
        return "ok" if annotations else "empty"
    except Exception:  # noqa: BLE001 - any failure means "generate it again"
        return "redo"


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


def cap_annotations(anns: list[dict], min_area: int = 0, max_masks: int = 0) -> list[dict]:
    """Drops masks smaller than min_area pixels, then keeps at most max_masks spread evenly over the
    range of areas (so every coverage ratio still finds a segment near it)."""
    anns = [a for a in anns if a["area"] >= min_area]
    if max_masks and len(anns) > max_masks:
        by_area = sorted(anns, key=lambda a: a["area"])
        picks = np.unique(np.round(np.linspace(0, len(by_area) - 1, max_masks)).astype(int))
        anns = [by_area[i] for i in picks]
    return anns


def sa1b_layout(anns: list[dict], image_id: int) -> list[dict]:
    """Annotations in SA-1B's key order, numbered (id) within their file."""
    out = []
    for k, a in enumerate(anns):
        a = {**a, "id": a.get("id", image_id * 100_000 + k)}
        out.append({key: a[key] for key in SA1B_ANNOTATION_KEYS if key in a}
                   | {key: v for key, v in a.items() if key not in SA1B_ANNOTATION_KEYS})
    return out


# ------------------------------------------------------------------------------------------------
# backends: a callable (H, W, 3) uint8 image -> list of annotations, with a `settings` dict

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


superpixel_segments.settings = {"backend": "superpixels", "felzenszwalb_scales": [100, 300, 1000],
                                "slic_segments": [8, 32]}


def superpixel_backend() -> Callable:
    return superpixel_segments


superpixel_backend.settings = superpixel_segments.settings


def recorded_generator(settings: dict | None, min_area: int = 0, max_masks: int = 0) -> dict | None:
    """The "generator" entry a file gets: the backend's settings, plus the caps when set."""
    if settings is None:
        return None
    return {**settings, **({"min_area": min_area} if min_area else {}), **({"max_masks": max_masks} if max_masks else {})}


GENERATOR_DEFAULTS = {"points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88,
                      "stability_score_thresh": 0.95, "box_nms_thresh": 0.7, "crop_n_layers": 0,
                      "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0}
GENERATOR_HELP = {
    "points_per_side": "prompts per side of the grid of point prompts (n x n points per image)",
    "points_per_batch": "point prompts run together (memory, not results)",
    "pred_iou_thresh": "drop masks whose predicted IoU is below this (0..1)",
    "stability_score_thresh": "drop masks whose stability score (IoU under threshold shifts) is below this",
    "box_nms_thresh": "IoU above which overlapping masks' boxes are merged by non-maximum suppression",
    "crop_n_layers": "also run on crops: 0 = whole image only, n = n layers of 2^k x 2^k crops (SA-1B: 1+)",
    "crop_n_points_downscale_factor": "points per side divided by this in each crop layer",
    "min_mask_region_area": "remove holes and islands smaller than this many pixels (needs OpenCV when > 0)",
}


def check_official_digest(path: str) -> None:
    """SAM's official files are named after the start of their MD5 (sam_vit_h_4b8939.pth): a file
    with such a name whose MD5 differs is a truncated or damaged download."""
    import re
    match = re.fullmatch(r"sam_vit_[hlb]_([0-9a-f]{6})\.pth", os.path.basename(path))
    if match and not file_digest(path, "md5").startswith(match.group(1)):
        raise SystemExit(f"--sam_checkpoint {path}: its MD5 does not start with {match.group(1)} as the official "
                         f"file's does: a truncated or damaged download; download it again")


def sam_settings(backend: str, checkpoint: str, model: str, amp: str = "none", sam2_config: str = "",
                 **settings) -> dict:
    """The "generator" entry of a SAM / SAM 2 mask file: everything that shaped its masks."""
    return {"backend": backend, "model": model, "checkpoint": os.path.basename(checkpoint) or RANDOM_WEIGHTS,
            "amp": amp, **({"sam2_config": sam2_config} if sam2_config else {}), **GENERATOR_DEFAULTS, **settings}


def build_sam_generator(backend: str, checkpoint: str, model: str, device: str, sam2_config: str = "",
                        random_weights: bool = False, **settings):
    """SAM's or SAM 2's automatic mask generator, coco_rle output. Errors a user can fix (package
    missing, no or missing checkpoint, checkpoint of another model) end in one line (SystemExit).
    Without a checkpoint SAM has random weights and finds nothing: refused unless random_weights
    (for tests of the pipeline)."""
    if not checkpoint and not random_weights:
        files = OFFICIAL_WEIGHTS[backend]
        raise SystemExit(f"--backend {backend} needs --sam_checkpoint: without weights SAM finds nothing. Download "
                         f"the official ones ({files}; README.md 'SAM weights' lists links and checksums), or pass "
                         f"--random_sam_weights to test the pipeline")
    if backend == "sam":
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError:
            raise SystemExit("the sam backend needs the segment-anything package: pip install "
                             "segment-anything (or use --backend superpixels)") from None
        if model not in SAM_MODELS:
            raise SystemExit(f"--sam_model {model} is not a SAM model ({', '.join(SAM_MODELS)})")
    else:
        try:
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
            from sam2.build_sam import build_sam2
        except ImportError:
            raise SystemExit("the sam2 backend needs the sam2 package: pip install sam2 (or use --backend sam)") from None
        if model not in SAM2_MODELS and not sam2_config:
            raise SystemExit(f"--sam_model {model} is not a SAM 2 model ({', '.join(SAM2_MODELS)}); or pass "
                             f"--sam2_config")
    if checkpoint and not os.path.isfile(checkpoint):
        raise SystemExit(f"--sam_checkpoint {checkpoint!r} not found: download one from the "
                         f"{'segment-anything' if backend == 'sam' else 'sam2'} model zoo")
    if checkpoint:
        check_official_digest(checkpoint)
    try:
        if backend == "sam":
            # built empty and filled from a weights-only load: segment-anything's own loading unpickles
            # anything (torch.load without weights_only), which runs code on torch < 2.6
            net = sam_model_registry[model](checkpoint=None)
            if checkpoint:
                net.load_state_dict(load_weights(checkpoint))
            net = net.to(device)
            return SamAutomaticMaskGenerator(net, output_mode="coco_rle", **settings)
        config = sam2_config or f"configs/sam2.1/sam2.1_{'hiera_' + SAM2_MODELS[model]}.yaml"
        net = build_sam2(config, checkpoint or None, device=device)
        return SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **settings)
    except RuntimeError as e:
        if "state_dict" in str(e) or "size mismatch" in str(e):
            raise SystemExit(f"--sam_checkpoint {checkpoint} does not fit --sam_model {model}: give the model the "
                             f"checkpoint was made for (e.g. sam_vit_b_01ec64.pth is vit_b)") from None
        raise


def load_weights(checkpoint: str) -> dict:
    """A SAM checkpoint's state dict, read weights-only (tensors and plain containers, no code)."""
    import torch
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an UnpicklingError or a damaged file: the same to the user
        raise SystemExit(f"--sam_checkpoint {checkpoint} is not a plain weights file (it holds other objects than "
                         f"tensors, or is damaged: {str(e).splitlines()[0][:200]}); use an official checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint's layout
        state = state["model"]
    if not isinstance(state, dict):
        raise SystemExit(f"--sam_checkpoint {checkpoint} holds no state dict; use an official checkpoint")
    return state


class SamBackend:
    """Segment-Anything's (or SAM 2's) automatic mask generator; ``generator`` may be given
    directly (tests inject a stand-in with the same ``generate`` method). ``amp`` runs it under
    bf16 / fp16 autocast on a GPU."""

    def __init__(self, checkpoint: str = "", model_type: str = "vit_h", device: str = "cuda", generator=None,
                 backend: str = "sam", amp: str = "none", sam2_config: str = "", **settings):
        settings = {**GENERATOR_DEFAULTS, **settings}
        if generator is None:
            generator = build_sam_generator(backend, checkpoint, model_type, device, sam2_config, **settings)
        self.generator, self.device, self.amp = generator, device, amp
        self.settings = sam_settings(backend, checkpoint, model_type, amp, sam2_config, **settings)

    def __call__(self, img: np.ndarray) -> list[dict]:
        import torch
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        device_type = str(self.device).split(":")[0]
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None and device_type == "cuda"):
            records = self.generator.generate(img)
        anns = []
        for r in records:
            ann = dict(r)
            if isinstance(ann["segmentation"], np.ndarray):  # binary_mask output mode
                ann["segmentation"] = encode_segmentation(ann["segmentation"])
            ann["area"] = int(ann["area"])
            anns.append(ann)
        return anns


# ------------------------------------------------------------------------------------------------

CLAIMED_ELSEWHERE = "claimed by another run"  # process_one's result for an image another run does


def process_one(job: tuple, backend: Callable) -> tuple[str, int, list[float], str | None]:
    """(relative path, number of masks, coverages, error) for one image. The job's optional last
    item is the "generator" entry to record (default: the backend's settings and the caps)."""
    rel, image_root, mask_root, image_id, min_area, max_masks, *rest = job
    generator = rest[:1]
    path = mask_path_for(mask_root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not claims.try_claim(path):
        return rel, 0, [], CLAIMED_ELSEWHERE
    try:
        if len(rest) > 1 and mask_file_state(path, rest[0]) != rest[1]:  # done by another run since listed
            return rel, 0, [], CLAIMED_ELSEWHERE
        img = np.asarray(load_rgb(os.path.join(image_root, rel)))
        anns = sa1b_layout(cap_annotations(backend(img), min_area, max_masks), image_id)
        h, w = img.shape[:2]
        write_mask_file(mask_path_for(mask_root, rel), anns,
                        {"image_id": image_id, "width": w, "height": h, "file_name": os.path.basename(rel)},
                        generator=generator[0] if generator else
                        recorded_generator(getattr(backend, "settings", None), min_area, max_masks))
        return rel, len(anns), [annotation_coverage(a) for a in anns], None
    except Exception as e:  # noqa: BLE001 - reported per image, the run goes on
        return rel, 0, [], f"{type(e).__name__}: {e}"
    finally:
        claims.release(path)


_WORKER_BACKEND: Callable | None = None


def _init_worker(backend_factory: Callable) -> None:
    global _WORKER_BACKEND
    _WORKER_BACKEND = backend_factory()


def _work(job):
    return process_one(job, _WORKER_BACKEND)


class Plan(NamedTuple):
    images: list[str]  # this rank's share
    todo: list[str]  # those that need a mask file
    states: dict[str, str]  # each image's mask_file_state
    image_ids: dict[str, int]  # every image's id, stable for the same tree
    empty: int  # images whose existing mask file is empty
    other: int  # images whose mask file another generator or other settings made


def plan(image_root: str, mask_root: str, rank: int, world_size: int, expected: dict | None, redo_empty: bool,
         keep_other_generators: bool) -> Plan:
    """What this rank has to do; prints what is done and what is left, and removes killed runs'
    temp files."""
    all_images = list_images(image_root)
    pairs = duplicate_stems(all_images)
    if pairs:
        raise SystemExit(f"{len(pairs)} pair(s) of images would share one mask file, e.g. "
                         f"{os.path.join(image_root, pairs[0][0])} and {os.path.join(image_root, pairs[0][1])}: "
                         f"rename or remove one of each pair")
    image_ids = {rel: i for i, rel in enumerate(all_images)}  # stable for the same tree
    images = all_images[rank::world_size]
    states = {rel: mask_file_state(mask_path_for(mask_root, rel), expected) for rel in images}
    todo = [rel for rel in images if states[rel] == "redo" or (redo_empty and states[rel] == "empty")
            or (states[rel] == "other" and not keep_other_generators)]
    empty_before = sum(state == "empty" for state in states.values())
    other = sum(state == "other" for state in states.values())
    print(f"{len(images)} images, {len(images) - len(todo)} already have a mask file"
          + (f" ({empty_before} of them empty; --redo_empty regenerates those)" if empty_before and not redo_empty
             else "") + f", {len(todo)} to do")
    if other:
        print(f"{other} mask file(s) were made by another generator or other settings than this run's "
              f"({expected.get('backend')} {expected.get('model', '')}): "
              + ("kept (--keep_other_generators)" if keep_other_generators
                 else "made again (--keep_other_generators keeps them)"))
    stale = sum(claims.remove_dead_temp_files(d) for d in sorted({os.path.dirname(mask_path_for(mask_root, rel))
                                                                  for rel in images}))
    if stale:
        print(f"removed {stale} temporary file(s) left in {mask_root} by killed runs")
    return Plan(images, todo, states, image_ids, empty_before, other)


def run_jobs(jobs: list[tuple], backend_factory: Callable, workers: int, mask_root: str,
             log_every: float) -> dict:
    """Runs the jobs (in a pool of ``workers`` processes when more than one), printing progress;
    returns the masks per image, their coverages, the errors, the images another run did and the
    bytes written."""
    done = {"counts": [], "coverages": [], "errors": [], "elsewhere": 0, "bytes": 0}
    start = last = time.time()
    if workers > 1 and jobs:
        freeze_heap(workers)
        pool = Pool(workers, initializer=_init_worker, initargs=(backend_factory,))
        results = pool.imap_unordered(_work, jobs, chunksize=4)
    else:
        pool, backend = None, backend_factory()
        results = (process_one(job, backend) for job in jobs)
    for i, (rel, n, cov, err) in enumerate(results, 1):
        if err == CLAIMED_ELSEWHERE:
            done["elsewhere"] += 1
        elif err:
            done["errors"].append(f"{rel}: {err}")
        else:
            done["counts"].append(n)
            done["coverages"] += cov
            done["bytes"] += os.path.getsize(mask_path_for(mask_root, rel))
        now = time.time()
        if now - last > log_every or i == len(jobs):
            speed = i / max(now - start, 1e-9)
            eta = (len(jobs) - i) / max(speed, 1e-9)
            print(f"\r[{i}/{len(jobs)}] {speed:.2f} images/s, ETA {eta / 60:.1f} min, "
                  f"{done['bytes'] / max(len(done['counts']), 1) / 1e3:.0f} KB/image", end="", flush=True)
            last = now
    if pool is not None:
        pool.close()
        pool.join()
    print()
    done["seconds"] = time.time() - start
    return done


def generate(data_path: str, backend_factory: Callable, split: str = "train", workers: int = 1,
             rank: int = 0, world_size: int = 1, log_every: float = 2.0, redo_empty: bool = False,
             min_area: int = 0, max_masks: int = 0, settings: dict | None = None,
             keep_other_generators: bool = False) -> dict:
    """Generates the missing mask files of this rank's share of the images; returns a summary.
    A file made by another generator or other settings (its "generator" entry differs from what this
    run records: ``settings``, default the factory's) is made again unless keep_other_generators."""
    image_root = os.path.join(data_path, split)
    mask_root = os.path.join(data_path, "masks")
    if not os.path.isdir(image_root):
        raise SystemExit(f"--data_path {data_path} has no {split}/ folder (expected {split}/<class>/<image>)")
    expected = recorded_generator(settings if settings is not None else getattr(backend_factory, "settings", None),
                                  min_area, max_masks)
    work = plan(image_root, mask_root, rank, world_size, expected, redo_empty, keep_other_generators)
    jobs = [(rel, image_root, mask_root, work.image_ids[rel], min_area, max_masks, expected, work.states[rel])
            for rel in work.todo]
    done = run_jobs(jobs, backend_factory, workers, mask_root, log_every)
    counts, seconds = done["counts"], done["seconds"]
    hist, edges = np.histogram(done["coverages"], bins=[0, 1, 5, 10, 25, 50, 75, 100.0001])
    summary = {"images": len(work.images), "generated": len(counts), "skipped_existing": len(work.images) - len(jobs),
               "empty": sum(n == 0 for n in counts) + (0 if redo_empty else work.empty),
               "other_generator": work.other,
               "done_by_another_run": done["elsewhere"],
               "failed": done["errors"], "masks_per_image": float(np.mean(counts)) if counts else 0.0,
               "kb_per_image": round(done["bytes"] / max(len(counts), 1) / 1e3, 1),
               "images_per_s": round(len(counts) / max(seconds, 1e-9), 3),
               "coverage_histogram": {f"{edges[k]:g}-{min(edges[k + 1], 100):g}%": int(hist[k]) for k in range(len(hist))},
               "seconds": round(seconds, 1)}
    print(json.dumps(summary, indent=1))
    if done["errors"]:
        print(f"{len(done['errors'])} image(s) failed, e.g. {done['errors'][0]}; rerun the same command to retry them",
              file=sys.stderr)
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="the dataset root: masks go to <data_path>/masks/")
    p.add_argument("--split", default="train", help="the folder under --data_path to make masks for (default: train)")
    p.add_argument("--backend", default=None, choices=["sam", "sam2", "superpixels"],
                   help="default: sam if segment-anything is installed and --sam_checkpoint given, else superpixels")
    p.add_argument("--sam_checkpoint", default="",
                   help="SAM / SAM 2 weights (README.md 'SAM weights': file names, links, checksums); required for "
                        "--backend sam / sam2")
    p.add_argument("--random_sam_weights", action="store_true",
                   help="testing only: run SAM without --sam_checkpoint, with random weights (it finds nothing)")
    p.add_argument("--sam_model", default=None, choices=[*SAM_MODELS, *SAM2_MODELS],
                   help="SAM: vit_h (default), vit_l, vit_b; SAM 2: hiera_tiny .. hiera_large (default hiera_large)")
    p.add_argument("--sam2_config", default="", help="SAM 2 model config (default: the sam2.1 one of --sam_model)")
    for name, default in GENERATOR_DEFAULTS.items():
        p.add_argument(f"--{name}", type=type(default), default=default,
                       help=f"SAM's automatic mask generator: {GENERATOR_HELP[name]} (default: %(default)s, SAM's)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast for SAM on a GPU (default: none)")
    p.add_argument("--min_area", type=int, default=0, help="drop masks smaller than this many pixels (default: 0)")
    p.add_argument("--max_masks", type=int, default=0,
                   help="keep at most N masks per image, spread over the range of areas (0: all); caps disk use")
    p.add_argument("--redo_empty", action="store_true", help="also regenerate mask files in which nothing was found")
    p.add_argument("--keep_other_generators", action="store_true",
                   help="keep mask files made by another backend or other settings (default: make them again)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU processes (superpixels; default: the CPU count)")
    add_local_rank_arg(p)  # torch.distributed.launch gives each rank one; the rank is read from RANK
    args = parse_flags(p, argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    backend = args.backend
    if backend is None:
        try:
            import segment_anything  # noqa: F401
            backend = "sam" if args.sam_checkpoint else "superpixels"
        except ImportError:
            backend = "superpixels"
    if backend in ("sam", "sam2"):
        import functools

        import torch
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        model = args.sam_model or ("vit_h" if backend == "sam" else "hiera_large")
        settings = {name: getattr(args, name) for name in GENERATOR_DEFAULTS}
        # built here, before any mask file is listed: a missing package or checkpoint fails at once
        generator = build_sam_generator(backend, args.sam_checkpoint, model, device, args.sam2_config,
                                        args.random_sam_weights, **settings)
        print(f"{backend} {model} on {device}" + ("" if device != "cpu" else
              " (no GPU visible: SAM on a CPU takes seconds to minutes per image)"))
        factory = functools.partial(SamBackend, args.sam_checkpoint, model, device, generator, backend, args.amp,
                                    args.sam2_config, **settings)
        workers = 1  # the GPU does the work
        recorded = sam_settings(backend, args.sam_checkpoint, model, args.amp, args.sam2_config, **settings)
    else:
        factory, workers, recorded = superpixel_backend, args.workers, superpixel_backend.settings
    print(f"backend {backend}, rank {rank}/{world}")
    return generate(args.data_path, factory, args.split, workers, rank, world, redo_empty=args.redo_empty,
                    min_area=args.min_area, max_masks=args.max_masks, settings=recorded,
                    keep_other_generators=args.keep_other_generators)


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
