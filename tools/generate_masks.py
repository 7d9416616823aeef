r"""Writes SAM-style mask files for an ImageFolder tree: <data_path>/masks/<class>/<stem>.json.

    # Segment-Anything (pip install segment-anything; a checkpoint from its model zoo)
    python tools/generate_masks.py --data_path /datasets/imagenet --backend sam \
        --sam_checkpoint sam_vit_h_4b8939.pth --sam_model vit_h
    # SAM 2 (pip install sam2; a checkpoint such as sam2.1_hiera_large.pt)
    python tools/generate_masks.py --data_path DATA --backend sam2 --sam_checkpoint sam2.1_hiera_large.pt \
        --sam_model hiera_large
    torchrun --nproc_per_node 8 tools/generate_masks.py ... --backend sam     # shards the file list
    python submitit_masks.py --array 32 --ngpus 8 ... --backend sam2 ...     # a SLURM array of such nodes
    python tools/generate_masks.py ... --estimate 20   # seconds per image and the dataset's wall-clock
    # without SAM: superpixels (scikit-image), overlapping segments at several scales
    python tools/generate_masks.py --data_path data/mydataset --backend superpixels --max_side 1024

Images are read as training reads them (Pillow, EXIF orientation not applied, 16-bit scaled to 8
bit), so every mask is on its image's pixel grid (or, with --max_side, on a downscaled copy of the
same aspect ratio, which training scales back). SAM runs in the main process on its GPU with all
of a crop's point prompts in one batch; --workers processes decode images ahead of it and encode
and write the files behind it (tools/mask_pipeline.py); superpixels run whole images in the
workers. Resumable: images whose mask file exists and parses and records this run's generator and
settings are skipped (--redo_empty also redoes files in which nothing was found; files of another
generator are made again unless --keep_other_generators). Every file is
written atomically in SA-1B's layout ({"image": {image_id, width, height, file_name},
"annotations": [{bbox, area, segmentation, predicted_iou, point_coords, crop_box, id,
stability_score}]}, COCO RLE) plus a "generator" entry with the backend and every setting that
shapes the masks, so a mask set can be reproduced. A kill (SIGTERM, SIGKILL, of the main process
or a worker) loses no written file, and a rerun makes exactly the missing ones. Ends with a
summary; the exit status is 1 if any image failed, 128 + the signal's number if stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import list_images  # noqa: E402 (its earlier home was this module)
from run.claims import remove_dead_temp_files  # noqa: E402
from run.files import file_digest  # noqa: E402
from run.flags import add_local_rank_arg, parse_flags  # noqa: E402
from run.stops import Stopped, stop_on_signals  # noqa: E402
from sam.files import duplicate_stems, encode_segmentation, mask_path_for  # noqa: E402
from sam.layouts import RANDOM_WEIGHTS  # noqa: E402
from tools.mask_pipeline import (CLAIMED_ELSEWHERE, NOT_RESULT_SETTINGS, Job, Outcome, Progress, claim,  # noqa: E402
                                 mask_file_state, release, run_jobs, stage_workers, whole)

SAM_MODELS = ("vit_h", "vit_l", "vit_b")
OFFICIAL_WEIGHTS = {"sam": "sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth",
                    "sam2": "sam2.1_hiera_large.pt, _base_plus.pt, _small.pt or _tiny.pt"}
SAM2_MODELS = {"hiera_tiny": "t", "hiera_small": "s", "hiera_base_plus": "b+", "hiera_large": "l"}


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


def recorded_generator(settings: dict | None, min_area: int = 0, max_masks: int = 0, max_side: int = 0) -> dict | None:
    """The "generator" entry a file gets: the backend's settings, plus the caps and --max_side when
    set."""
    if settings is None:
        return None
    return {**settings, **({"min_area": min_area} if min_area else {}), **({"max_masks": max_masks} if max_masks else {}),
            **({"max_side": max_side} if max_side else {})}


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
                 compile: bool = False, **settings) -> dict:
    """The "generator" entry of a SAM / SAM 2 mask file: everything that shaped its masks (not
    points_per_batch, which changes memory use only)."""
    entry = {"backend": backend, "model": model, "checkpoint": os.path.basename(checkpoint) or RANDOM_WEIGHTS,
             "amp": amp, **({"sam2_config": sam2_config} if sam2_config else {}),
             **({"compile": True} if compile else {}), **GENERATOR_DEFAULTS, **settings}
    return {k: v for k, v in entry.items() if k not in NOT_RESULT_SETTINGS}


def default_points_per_batch(device: str, points_per_side: int) -> int:
    """All point prompts of a crop in one batch on a GPU (the same masks as SAM's 64 at a time, in
    less time); SAM's 64 on a CPU, where a larger batch only costs memory."""
    return points_per_side ** 2 if str(device).startswith("cuda") else GENERATOR_DEFAULTS["points_per_batch"]


def build_sam_generator(backend: str, checkpoint: str, model: str, device: str, sam2_config: str = "",
                        random_weights: bool = False, compile: bool = False, **settings):
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
            net = compiled(net.to(device), compile)
            return SamAutomaticMaskGenerator(net, output_mode="coco_rle", **settings)
        config = sam2_config or f"configs/sam2.1/sam2.1_{'hiera_' + SAM2_MODELS[model]}.yaml"
        net = compiled(build_sam2(config, checkpoint or None, device=device), compile)
        return SAM2AutomaticMaskGenerator(net, output_mode="coco_rle", **settings)
    except RuntimeError as e:
        if "state_dict" in str(e) or "size mismatch" in str(e):
            raise SystemExit(f"--sam_checkpoint {checkpoint} does not fit --sam_model {model}: give the model the "
                             f"checkpoint was made for (e.g. sam_vit_b_01ec64.pth is vit_b)") from None
        raise


def compiled(net, compile: bool):
    """The model with its image encoder (most of a generator's time) under torch.compile, when
    asked: faster on a GPU, and known to change the masks of some images (so it is recorded)."""
    if compile:
        import torch
        net.image_encoder = torch.compile(net.image_encoder)
    return net


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
    bf16 / fp16 autocast on a GPU. It runs in the main process, between the decode and write
    pools; the package's generator gives its masks as uncompressed RLE, which the write stage
    compresses exactly as the package's coco_rle output would be."""
    runs_in_main = True

    def __init__(self, checkpoint: str = "", model_type: str = "vit_h", device: str = "cuda", generator=None,
                 backend: str = "sam", amp: str = "none", sam2_config: str = "", compile: bool = False, **settings):
        settings = {**GENERATOR_DEFAULTS, **settings}
        if generator is None:
            generator = build_sam_generator(backend, checkpoint, model_type, device, sam2_config, compile=compile,
                                            **settings)
        if getattr(generator, "output_mode", None) == "coco_rle":
            generator.output_mode = "uncompressed_rle"  # compressed by the write stage, off this process
        self.generator, self.device, self.amp = generator, device, amp
        self.settings = sam_settings(backend, checkpoint, model_type, amp, sam2_config, compile, **settings)

    def __call__(self, img: np.ndarray) -> list[dict]:
        import torch
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        device_type = str(self.device).split(":")[0]
        while True:
            try:
                with torch.inference_mode(), torch.autocast(device_type, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None and device_type == "cuda"):
                    records = self.generator.generate(img)
                break
            except torch.OutOfMemoryError:
                # all of a crop's prompts at once need memory in proportion to the image's pixels:
                # fewer per batch give the same masks
                batch = getattr(self.generator, "points_per_batch", 1)
                if batch <= 1:
                    raise
                self.generator.points_per_batch = batch // 2
                if device_type == "cuda":
                    torch.cuda.empty_cache()
                print(f"\nout of GPU memory with {batch} point prompts per batch on a {img.shape[1]}x{img.shape[0]} "
                      f"image: {batch // 2} from now on (the same masks)", file=sys.stderr)
        anns = []
        for r in records:
            ann = dict(r)
            if isinstance(ann["segmentation"], np.ndarray):  # binary_mask output mode
                ann["segmentation"] = encode_segmentation(ann["segmentation"])
            ann["area"] = int(ann["area"])
            anns.append(ann)
        return anns


# ------------------------------------------------------------------------------------------------

def process_one(job: tuple, backend: Callable) -> Outcome:
    """One image through every stage in this process, its mask file claimed meanwhile: ``job`` is a
    Job or its leading fields (relative path, image root, mask root, image id, min_area, max_masks,
    ...)."""
    job = Job(*job)
    if not claim(job):
        return Outcome(job.rel, 0, [], CLAIMED_ELSEWHERE)
    try:
        return whole(job, backend)
    finally:
        release(job)


class Plan(NamedTuple):
    images: list[str]  # this rank's share
    todo: list[str]  # those that need a mask file
    states: dict[str, str]  # each image's mask_file_state
    image_ids: dict[str, int]  # every image's id, stable for the same tree
    empty: int  # images whose existing mask file is empty
    other: int  # images whose mask file another generator or other settings made
    total: int  # images of every rank


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
    stale = sum(remove_dead_temp_files(d) for d in sorted({os.path.dirname(mask_path_for(mask_root, rel))
                                                                  for rel in images}))
    if stale:
        print(f"removed {stale} temporary file(s) left in {mask_root} by killed runs")
    return Plan(images, todo, states, image_ids, empty_before, other, len(all_images))


def generate(data_path: str, backend_factory: Callable, split: str = "train", workers: int = 1,
             rank: int = 0, world_size: int = 1, log_every: float = 2.0, redo_empty: bool = False,
             min_area: int = 0, max_masks: int = 0, settings: dict | None = None,
             keep_other_generators: bool = False, max_side: int = 0, estimate: int = 0, gpus: int = 8) -> dict:
    """Generates the missing mask files of this rank's share of the images; returns a summary.
    A file made by another generator or other settings (its "generator" entry differs from what this
    run records: ``settings``, default the factory's) is made again unless keep_other_generators.
    ``workers``: CPU processes (0: everything in this process, one image after another; a CPU
    backend also runs so with 1); ``max_side``: generate on a copy downscaled to this longer side;
    ``estimate`` N: time N images (after a warm-up) into a temporary folder and project the cost,
    writing nothing under masks/."""
    image_root = os.path.join(data_path, split)
    mask_root = os.path.join(data_path, "masks")
    if not os.path.isdir(image_root):
        raise SystemExit(f"--data_path {data_path} has no {split}/ folder (expected {split}/<class>/<image>)")
    expected = recorded_generator(settings if settings is not None else getattr(backend_factory, "settings", None),
                                  min_area, max_masks, max_side)
    work = plan(image_root, mask_root, rank, world_size, expected, redo_empty, keep_other_generators)
    if estimate:
        return estimate_cost(work, image_root, split, backend_factory, workers, estimate, gpus, expected, min_area,
                             max_masks, max_side)
    jobs = [Job(rel, image_root, mask_root, work.image_ids[rel], min_area, max_masks, expected, work.states[rel],
                max_side) for rel in work.todo]
    progress = Progress(mask_root, split, rank, world_size, work.total, len(work.images),
                        len(work.images) - len(jobs), log_every)
    try:
        with stop_on_signals():
            done = run_jobs(jobs, backend_factory, workers, progress)
    except Stopped as stop:
        # every file written so far is complete, and no claim outlives this process
        print(f"\ngenerate_masks.py stopped by {stop}; the files written so far are complete; run the same command "
              f"to make the rest", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    counts, seconds = done["counts"], done["seconds"]
    hist, edges = np.histogram(done["coverages"], bins=[0, 1, 5, 10, 25, 50, 75, 100.0001])
    measured = max(len(jobs) - done["elsewhere"], 1)
    summary = {"images": len(work.images), "generated": len(counts), "skipped_existing": len(work.images) - len(jobs),
               "empty": sum(n == 0 for n in counts) + (0 if redo_empty else work.empty),
               "other_generator": work.other,
               "done_by_another_run": done["elsewhere"],
               "failed": done["errors"], "masks_per_image": float(np.mean(counts)) if counts else 0.0,
               "kb_per_image": round(done["bytes"] / max(len(counts), 1) / 1e3, 1),
               "images_per_s": round(len(counts) / max(seconds, 1e-9), 3),
               "coverage_histogram": {f"{edges[k]:g}-{min(edges[k + 1], 100):g}%": int(hist[k]) for k in range(len(hist))},
               "seconds": round(seconds, 1), "mode": done["mode"],
               "s_per_image": {stage: round(done[f"{stage}_s"] / measured, 4) for stage in ("decode", "model", "write")},
               "model_idle_share": round(done["model_idle_share"], 3),
               "model_waits_for_input_share": round(done["model_wait_s"] / max(seconds, 1e-9), 3)}
    print(json.dumps(summary, indent=1))
    if done["errors"]:
        print(f"{len(done['errors'])} image(s) failed, e.g. {done['errors'][0]}; rerun the same command to retry them",
              file=sys.stderr)
    return summary


ESTIMATE_WARMUP = 1  # images run before the clock starts (model loading, compilation, caches)


def estimate_cost(work: Plan, image_root: str, split: str, backend_factory: Callable, workers: int, n: int,
                  gpus: int, expected: dict | None, min_area: int, max_masks: int, max_side: int) -> dict:
    """Runs ESTIMATE_WARMUP + n images of this rank's share (spread over it) as the real run would,
    into a temporary folder (nothing is written under masks/), prints the seconds per image of each
    stage and projects the whole split's wall-clock on this rank alone and on ``gpus`` like it."""
    if not work.images:
        raise SystemExit(f"--estimate: {image_root} has no image in this rank's share")
    picks = np.unique(np.linspace(0, len(work.images) - 1, min(n + ESTIMATE_WARMUP, len(work.images))).round())
    rels = [work.images[int(i)] for i in picks]
    scratch = tempfile.mkdtemp(prefix="generate_masks_estimate_")
    try:
        jobs = [Job(rel, image_root, scratch, work.image_ids[rel], min_area, max_masks, expected, None, max_side)
                for rel in rels]
        warm = ESTIMATE_WARMUP if len(jobs) > ESTIMATE_WARMUP else 0
        run_jobs(jobs[:warm], backend_factory, 0)
        done = run_jobs(jobs[warm:], backend_factory, workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timed = max(len(jobs) - warm, 1)
    per = {stage: done[f"{stage}_s"] / timed for stage in ("decode", "model", "write")}
    wall = done["seconds"] / timed
    left = round(len(work.todo) / len(work.images) * work.total)
    mode = done["mode"]
    n_decode, n_write = stage_workers(workers) if mode == "pipeline" else (workers, workers) if mode == "pool" else (1, 1)
    hours = work.total * wall / 3600
    where = "in each of the" if mode == "pool" else "in"
    print(f"estimate over {timed} image(s) after {warm} warm-up ({mode}, {max(workers, 1)} CPU process(es)):")
    print(f"  decode        {per['decode']:.3f} s/image ({where} {n_decode} process(es))")
    print(f"  model         {per['model']:.3f} s/image" + (f" (in each of the {workers} processes)" if mode == "pool" else ""))
    print(f"  encode+write  {per['write']:.3f} s/image ({where} {n_write} process(es))")
    print(f"  wall-clock    {wall:.3f} s/image ({1 / max(wall, 1e-9):.2f} images/s); the model stage idle "
          f"{100 * done['model_idle_share']:.0f} % of the time")
    print(f"  all {work.total:,} images of {split}/: {duration(hours * 3600)} on this rank alone, "
          f"{duration(hours * 3600 / gpus)} on {gpus} GPUs (or ranks) of this kind; {left:,} of them still to make: "
          f"{duration(left * wall)}, {duration(left * wall / gpus)}")
    if done["errors"]:
        print(f"  {len(done['errors'])} image(s) failed, e.g. {done['errors'][0]}", file=sys.stderr)
    return {"estimate_images": timed, "warmup": warm, "mode": mode,
            "s_per_image": {"decode": per["decode"], "model": per["model"], "write": per["write"], "wall": wall},
            "model_idle_share": done["model_idle_share"], "images": work.total, "left": left,
            "hours": hours, "gpus": gpus, "hours_on_gpus": hours / gpus, "failed": done["errors"]}


def duration(seconds: float) -> str:
    """'42 s', '3.5 min', '7.2 h' or '12.3 days'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 3 * 86400 else f"{seconds / 86400:.1f} days"


def shard_of_this_process(shard: int | None = None, shards: int | None = None) -> tuple[int, int]:
    """(rank, world): this process's share of the file list. torchrun's RANK / WORLD_SIZE split a
    node's (or job's) share; a SLURM array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and
    SLURM_ARRAY_TASK_COUNT, consecutive ids) or --shard / --shards split the list between jobs
    first."""
    inner_rank, inner_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if shards is None and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
        shards = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        shard = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    shards, shard = shards or 1, shard or 0
    if not 0 <= shard < shards:
        raise SystemExit(f"--shard {shard} is not in 0..{shards - 1} (--shards {shards})")
    return shard * inner_world + inner_rank, shards * inner_world


def default_workers() -> int:
    """The CPUs this process may use (its affinity: SLURM's and taskset's limits), shared between the
    ranks of a node (torchrun's LOCAL_WORLD_SIZE)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=add_help)
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
        if name == "points_per_batch":  # a memory setting: its default depends on the device
            p.add_argument("--points_per_batch", type=int, default=None,
                           help=f"SAM's automatic mask generator: {GENERATOR_HELP[name]} (default: {default}, SAM's) "
                                f"on a CPU; on a GPU points_per_side ** 2, all of a crop's points in one batch (the "
                                f"same masks); not recorded")
            continue
        p.add_argument(f"--{name}", type=type(default), default=default,
                       help=f"SAM's automatic mask generator: {GENERATOR_HELP[name]} (default: %(default)s, SAM's)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast for SAM on a GPU (default: none); changes some masks, recorded")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile SAM's image encoder (GPU): faster, changes some masks, recorded")
    p.add_argument("--max_side", type=int, default=0,
                   help="generate on a copy whose longer side is at most N pixels (0: the stored pixels; training "
                        "scales such masks to the image); much faster on large photos, recorded")
    p.add_argument("--min_area", type=int, default=0, help="drop masks smaller than this many pixels (default: 0)")
    p.add_argument("--max_masks", type=int, default=0,
                   help="keep at most N masks per image, spread over the range of areas (0: all); caps disk use")
    p.add_argument("--redo_empty", action="store_true", help="also regenerate mask files in which nothing was found")
    p.add_argument("--keep_other_generators", action="store_true",
                   help="keep mask files made by another backend or other settings (default: make them again)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="CPU processes of this rank: SAM: decode ahead of the model and encode + write behind it; "
                        "superpixels: whole images; 0: one process, one image after another (default: this "
                        "process's CPUs / torchrun's ranks on the node, %(default)s here)")
    p.add_argument("--estimate", type=int, default=0, metavar="N",
                   help="time N images after a warm-up, writing nothing under masks/, print the seconds per image "
                        "of decode, model and encode + write, project the split's wall-clock, and exit")
    p.add_argument("--estimate_gpus", type=int, default=8, metavar="K",
                   help="--estimate also projects the wall-clock on K GPUs (or ranks) like this one (default: 8)")
    p.add_argument("--shard", type=int, default=None,
                   help="this job's share of the file list, 0..--shards-1 (default: SLURM_ARRAY_TASK_ID in a SLURM "
                        "array, else 0); torchrun's ranks split the shard")
    p.add_argument("--shards", type=int, default=None,
                   help="how many jobs share the file list (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--log_every", type=float, default=10.0,
                   help="seconds between progress lines (and, with several ranks, shared progress files)")
    add_local_rank_arg(p)  # torch.distributed.launch gives each rank one; the rank is read from RANK
    return p


def main(argv=None, args: argparse.Namespace | None = None) -> dict:
    """Runs the tool on ``argv`` (or on already parsed ``args``: the SLURM job's)."""
    args = args if args is not None else parse_flags(get_args_parser(), argv)
    if args.estimate < 0 or args.workers < 0 or args.max_side < 0:
        raise SystemExit("--estimate, --workers and --max_side take a number >= 0")
    rank, world = shard_of_this_process(args.shard, args.shards)
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
        if settings["points_per_batch"] is None:
            settings["points_per_batch"] = default_points_per_batch(device, args.points_per_side)
        # built here, before any mask file is listed: a missing package or checkpoint fails at once
        generator = build_sam_generator(backend, args.sam_checkpoint, model, device, args.sam2_config,
                                        args.random_sam_weights, args.compile, **settings)
        print(f"{backend} {model} on {device}, {settings['points_per_batch']} point prompts per batch"
              + ("" if device != "cpu" else " (no GPU visible: SAM on a CPU takes seconds to minutes per image)"))
        factory = functools.partial(SamBackend, args.sam_checkpoint, model, device, generator, backend, args.amp,
                                    args.sam2_config, args.compile, **settings)
        recorded = sam_settings(backend, args.sam_checkpoint, model, args.amp, args.sam2_config, args.compile,
                                **settings)
    else:
        factory, recorded = superpixel_backend, superpixel_backend.settings
    print(f"backend {backend}, rank {rank}/{world}, {args.workers} worker process(es)")
    return generate(args.data_path, factory, args.split, args.workers, rank, world, log_every=args.log_every,
                    redo_empty=args.redo_empty, min_area=args.min_area, max_masks=args.max_masks, settings=recorded,
                    keep_other_generators=args.keep_other_generators, max_side=args.max_side,
                    estimate=args.estimate, gpus=args.estimate_gpus)

if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
