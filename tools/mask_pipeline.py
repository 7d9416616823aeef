"""The stages of tools/generate_masks.py and the loops that run them.

An image goes through three stages: decode (read the file as training reads it: Pillow, EXIF
orientation not applied, 16-bit scaled; optionally downscaled to --max_side), model (the backend
finds the masks) and write (RLE compression, the caps, SA-1B's layout, one atomic JSON write).
They run in one of three ways:

  - serial: one process, one image after another (``--workers 0``; what the tool did before the
    pipeline, kept as the reference for the proofs and the measurements);
  - pipeline, for a backend whose model runs in this process (SAM on its GPU): a pool of decode
    processes fills a bounded queue ahead of the model, and a pool of write processes takes the
    masks behind it, so the model never waits for a decode or a write unless the CPUs fall behind;
  - pool, for a CPU backend (superpixels): each worker process runs all three stages for one image.

The main process claims each image's mask file (run/claims.py) before the image enters any stage
and releases it when the file is written or the image failed, so a killed worker or a killed main
process leaves no file half-written (every write is atomic) and no live claim: a rerun makes
exactly the missing files. Every stage's seconds are counted, for the summary and --estimate.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Callable, Iterator, NamedTuple

import numpy as np
from PIL import Image

import run.claims as claims
from inputs.images import load_rgb
from inputs.pretrain import freeze_heap
from run.files import atomic_write_json
from sam.files import annotation_coverage, encode_segmentation, mask_path_for, write_mask_file

# SA-1B's key order of an annotation; keys a backend does not give are left out
SA1B_ANNOTATION_KEYS = ("bbox", "area", "segmentation", "predicted_iou", "point_coords", "crop_box", "id",
                        "stability_score")
# generator settings that change memory use or speed, never a mask: not part of the comparison that
# decides whether an existing file is made again (older files recorded them)
NOT_RESULT_SETTINGS = ("points_per_batch",)
WORKER_DIED = "a worker process ended (killed, or out of memory) before this image was written"


class Job(NamedTuple):
    rel: str  # the image, relative to image_root
    image_root: str
    mask_root: str
    image_id: int
    min_area: int = 0
    max_masks: int = 0
    generator: dict | None = None  # the "generator" entry to record
    state: str | None = None  # the mask file's state when the run was planned (None: not checked)
    max_side: int = 0  # generate on a copy whose longer side is at most this (0: the stored pixels)


class Outcome(NamedTuple):
    rel: str
    masks: int
    coverages: list
    error: str | None
    bytes: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0


CLAIMED_ELSEWHERE = "claimed by another run"  # the error of an image another run does


# ------------------------------------------------------------------------------------------------
# the stages

def comparable(entry: dict | None) -> dict | None:
    """A "generator" entry without the settings that change no mask (NOT_RESULT_SETTINGS)."""
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items() if k not in NOT_RESULT_SETTINGS}


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
        if expected is not None and recorded is not None and comparable(recorded) != comparable(expected):
            return "other"
        return "ok" if annotations else "empty"
    except Exception:  # noqa: BLE001 - any failure means "generate it again"
        return "redo"


def downscaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(W, H) of the copy whose longer side is max_side, the aspect ratio kept to the pixel (what
    sam/geometry.py accepts as the same picture at another resolution); the size itself when it
    is no larger."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode(job: Job) -> tuple[np.ndarray, tuple[int, int]]:
    """The image's pixels as training reads them, downscaled to job.max_side (antialiased
    bilinear), and its stored size (W, H)."""
    img = load_rgb(os.path.join(job.image_root, job.rel))
    size = img.size
    target = downscaled_size(*size, job.max_side)
    if target != size:
        img = img.resize(target, Image.BILINEAR)
    return np.asarray(img), size


def compress_segmentation(segmentation) -> dict:
    """A mask in SAM's coco_rle form: an uncompressed RLE (counts as a list, what the generator gives
    with output_mode="uncompressed_rle") compressed by pycocotools exactly as the package's own
    coco_rle output is; a binary array encoded; a compressed RLE as it is."""
    if isinstance(segmentation, np.ndarray):
        return encode_segmentation(segmentation)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        from pycocotools import mask as mask_utils
        h, w = segmentation["size"]
        rle = mask_utils.frPyObjects(segmentation, h, w)
        rle["counts"] = rle["counts"].decode("utf-8")
        return rle
    return segmentation


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


def write(job: Job, anns: list[dict], size: tuple[int, int]) -> tuple[int, list[float], int]:
    """Compresses, caps, lays out and atomically writes the image's mask file; (masks, their
    coverages, bytes written). ``size``: the image's stored (W, H), which the file's image entry
    records (the masks' own size is in each RLE)."""
    anns = [{**a, "segmentation": compress_segmentation(a["segmentation"])} for a in anns]
    anns = sa1b_layout(cap_annotations(anns, job.min_area, job.max_masks), job.image_id)
    path = mask_path_for(job.mask_root, job.rel)
    w, h = size
    write_mask_file(path, anns, {"image_id": job.image_id, "width": w, "height": h,
                                 "file_name": os.path.basename(job.rel)}, generator=job.generator)
    return len(anns), [annotation_coverage(a) for a in anns], os.path.getsize(path)


def whole(job: Job, backend: Callable) -> Outcome:
    """All three stages for one image (the serial loop and the CPU pool's workers); an error is
    reported in the outcome and the run goes on."""
    stamps = [time.perf_counter()]
    try:
        img, size = decode(job)
        stamps.append(time.perf_counter())
        anns = backend(img)
        stamps.append(time.perf_counter())
        n, coverages, size_bytes = write(job, anns, size)
        stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - reported per image
        return Outcome(job.rel, 0, [], f"{type(e).__name__}: {e}")
    return Outcome(job.rel, n, coverages, None, size_bytes, *np.diff(stamps).tolist())


# ------------------------------------------------------------------------------------------------
# worker processes

def _die_with_parent() -> None:
    """A worker ends when the main process does, even by SIGKILL (Linux): no orphan keeps writing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


_WORKER_BACKEND: Callable | None = None


def _init_worker(backend_factory: Callable | None) -> None:
    global _WORKER_BACKEND
    _die_with_parent()
    if backend_factory is not None:
        _WORKER_BACKEND = backend_factory()


def _whole_task(job: Job) -> Outcome:
    return whole(job, _WORKER_BACKEND)


def _decode_task(job: Job):
    start = time.perf_counter()
    try:
        img, size = decode(job)
    except Exception as e:  # noqa: BLE001 - reported per image
        return None, None, f"{type(e).__name__}: {e}", time.perf_counter() - start
    return img, size, None, time.perf_counter() - start


def _write_task(job: Job, anns: list[dict], size: tuple[int, int]) -> Outcome:
    start = time.perf_counter()
    try:
        n, coverages, size_bytes = write(job, anns, size)
    except Exception as e:  # noqa: BLE001 - reported per image
        return Outcome(job.rel, 0, [], f"{type(e).__name__}: {e}")
    return Outcome(job.rel, n, coverages, None, size_bytes, write_s=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# progress over all ranks

class Progress:
    """This rank's progress line, and every rank's work together: each rank writes its counts to
    <mask_root>/.progress/<split>-rank<r>-of-<n>.json (a hidden folder, which mask listings skip)
    and reads the others', so each log shows images/s and the ETA of the whole job (torchrun ranks
    and SLURM array tasks alike). A rank that has not started yet counts as nothing done."""

    def __init__(self, mask_root: str, split: str, rank: int, world: int, total: int, share: int,
                 done_before: int, log_every: float = 10.0, quiet: bool = False):
        self.folder = os.path.join(mask_root, ".progress")
        self.path = os.path.join(self.folder, f"{split}-rank{rank:05d}-of-{world:05d}.json")
        self.split, self.world, self.total, self.share = split, world, total, share
        self.done_before, self.log_every, self.quiet = done_before, log_every, quiet
        self.start = self.last = time.time()

    def update(self, i: int, jobs: int, generated: int, kb_per_image: float, final: bool = False) -> None:
        now = time.time()
        if not (final or now - self.last >= self.log_every):
            return
        self.last = now
        speed = i / max(now - self.start, 1e-9)
        line = (f"[{i}/{jobs}] {speed:.2f} images/s, ETA {(jobs - i) / max(speed, 1e-9) / 60:.1f} min, "
                f"{kb_per_image:.0f} KB/image")
        if self.world > 1 and not self.quiet:
            line += "; " + self.all_ranks(i, jobs, speed, now)
        if not self.quiet:
            # one line rewritten in place on a terminal; a line each in a log file (SLURM's)
            print("\r" + line, end="\n" if final or not sys.stdout.isatty() else "", flush=True)

    def all_ranks(self, i: int, jobs: int, speed: float, now: float) -> str:
        mine = {"done": self.done_before + i, "share": self.share, "images_per_s": speed,
                "left": jobs - i, "updated": now}
        try:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write_json(self.path, mine)
        except OSError:
            pass
        done = rate = reporting = 0
        prefix = f"{self.split}-rank"
        suffix = f"-of-{self.world:05d}.json"
        for name in os.listdir(self.folder) if os.path.isdir(self.folder) else []:
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            try:
                with open(os.path.join(self.folder, name)) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                continue
            reporting += 1
            done += int(other.get("done", 0))
            if other.get("left", 0) > 0 and now - float(other.get("updated", 0)) < 10 * max(self.log_every, 60):
                rate += float(other.get("images_per_s", 0))  # a running rank's speed
        left = max(self.total - done, 0)
        eta = f"{left / rate / 3600:.1f} h" if rate > 0 else "?"
        return (f"all ranks ({reporting}/{self.world} reporting): {done}/{self.total} done, {rate:.2f} images/s, "
                f"ETA {eta}")


# ------------------------------------------------------------------------------------------------
# the loops

class Tally:
    """What a run did: per-image results and the seconds of each stage."""

    def __init__(self):
        self.counts: list[int] = []
        self.coverages: list[float] = []
        self.errors: list[str] = []
        self.elsewhere = 0
        self.bytes = 0
        self.decode_s = self.model_s = self.write_s = 0.0
        self.model_wait_s = 0.0  # the model stage waiting for a decoded image (pipeline)
        self.seen = 0

    def add(self, outcome: Outcome) -> None:
        self.seen += 1
        if outcome.error == CLAIMED_ELSEWHERE:
            self.elsewhere += 1
        elif outcome.error:
            self.errors.append(f"{outcome.rel}: {outcome.error}")
        else:
            self.counts.append(outcome.masks)
            self.coverages += outcome.coverages
            self.bytes += outcome.bytes
        self.decode_s += outcome.decode_s
        self.model_s += outcome.model_s
        self.write_s += outcome.write_s


def claim(job: Job) -> bool:
    """Claims the image's mask file for this process; False when another run holds it or has made
    the file since the run was planned."""
    path = mask_path_for(job.mask_root, job.rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not claims.try_claim(path):
        return False
    if job.state is not None and mask_file_state(path, job.generator) != job.state:
        claims.release(path)
        return False
    return True


def release(job: Job) -> None:
    claims.release(mask_path_for(job.mask_root, job.rel))


def run_mode(backend, workers: int) -> str:
    """'serial', 'pipeline' (the model in this process, between decode and write pools) or 'pool'."""
    if workers <= 0 or (workers == 1 and not getattr(backend, "runs_in_main", False)):
        return "serial"
    return "pipeline" if getattr(backend, "runs_in_main", False) else "pool"


def stage_workers(workers: int) -> tuple[int, int]:
    """The pipeline's decode and write processes out of ``workers``: decode gets the odd one."""
    return max(1, (workers + 1) // 2), max(1, workers // 2)


def run_jobs(jobs: list[Job], backend_factory: Callable, workers: int, progress: Progress | None = None) -> dict:
    """Runs the jobs (run_mode decides how) and returns the summary's raw material: masks per image,
    coverages, errors, images another run did, bytes, each stage's seconds, the wall-clock and the
    share of it the model stage sat idle."""
    backend = backend_factory()
    mode = run_mode(backend, workers)
    tally = Tally()
    start = time.perf_counter()

    def report(final: bool = False) -> None:
        if progress is not None:
            progress.update(tally.seen, len(jobs), len(tally.counts),
                            tally.bytes / max(len(tally.counts), 1) / 1e3, final)

    if mode == "serial":
        for job in jobs:
            if not claim(job):
                tally.add(Outcome(job.rel, 0, [], CLAIMED_ELSEWHERE))
            else:
                try:
                    tally.add(whole(job, backend))
                finally:
                    release(job)
            report()
        model_stages = 1
    elif mode == "pool":
        if jobs:  # no processes to start for nothing
            _run_pool(jobs, backend_factory, workers, tally, report)
        model_stages = workers
    else:
        if jobs:
            _run_pipeline(jobs, backend, workers, tally, report)
        model_stages = 1
    report(final=True)
    seconds = time.perf_counter() - start
    return {"counts": tally.counts, "coverages": tally.coverages, "errors": tally.errors,
            "elsewhere": tally.elsewhere, "bytes": tally.bytes, "seconds": seconds, "mode": mode,
            "decode_s": tally.decode_s, "model_s": tally.model_s, "write_s": tally.write_s,
            "model_wait_s": tally.model_wait_s,
            "model_idle_share": (max(0.0, 1 - tally.model_s / (model_stages * seconds)) if seconds > 0 and jobs
                                 else 0.0)}


def _executor(workers: int, backend_factory: Callable | None = None) -> ProcessPoolExecutor:
    freeze_heap(workers)
    # forked: the workers start at once and share the loaded modules; they use no GPU
    return ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                               initargs=(backend_factory,))


def _stop_pools(*pools: ProcessPoolExecutor) -> None:
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ProcessPoolExecutor, job: Job, tally: Tally, task: Callable, *args):
    """pool.submit; on a pool broken by a dead worker the claimed job is released and counted."""
    try:
        return pool.submit(task, *args)
    except BrokenProcessPool:
        release(job)
        tally.add(Outcome(job.rel, 0, [], WORKER_DIED))
        raise


def _next_claimed(todo: Iterator[Job], tally: Tally) -> Job | None:
    """The next job whose mask file this process could claim (None: no more); the ones another
    process holds are counted as such."""
    for job in todo:
        if claim(job):
            return job
        tally.add(Outcome(job.rel, 0, [], CLAIMED_ELSEWHERE))
    return None


def _run_pool(jobs: list[Job], backend_factory: Callable, workers: int, tally: Tally, report: Callable) -> None:
    pool = _executor(workers, backend_factory)
    running: dict = {}  # future -> job
    todo = iter(jobs)
    try:
        while True:
            while len(running) < 2 * workers and (job := _next_claimed(todo, tally)) is not None:
                running[_submit(pool, job, tally, _whole_task, job)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    tally.add(future.result())
                except BrokenProcessPool:
                    tally.add(Outcome(job.rel, 0, [], WORKER_DIED))
                    for other in running:
                        tally.add(Outcome(running[other].rel, 0, [], WORKER_DIED))
                    raise
                finally:
                    release(job)
                report()
    except BrokenProcessPool:
        print(f"\n{WORKER_DIED}: stopping; rerun the same command to make the missing files", file=sys.stderr)
    finally:
        for job in running.values():
            release(job)
        _stop_pools(pool)


def _run_pipeline(jobs: list[Job], backend: Callable, workers: int, tally: Tally, report: Callable) -> None:
    n_decode, n_write = stage_workers(workers)
    decoders, writers = _executor(n_decode), _executor(n_write)
    ahead: deque = deque()  # (job, future) in decode, in order
    writing: dict = {}  # future -> (job, its outcome so far)
    todo = iter(jobs)
    in_hand = None

    def harvest(block: bool) -> None:
        if not writing:
            return
        finished, _ = wait(writing, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in finished:
            job, so_far = writing.pop(future)
            try:
                written = future.result()
            except BrokenProcessPool:
                written = Outcome(job.rel, 0, [], WORKER_DIED)
            finally:
                release(job)
            tally.add(written._replace(decode_s=so_far.decode_s, model_s=so_far.model_s))
            report()
            if written.error == WORKER_DIED:
                raise BrokenProcessPool(WORKER_DIED)

    try:
        while True:
            # the bounded queue ahead of the model
            while len(ahead) < 2 * n_decode + 1 and (job := _next_claimed(todo, tally)) is not None:
                ahead.append((job, _submit(decoders, job, tally, _decode_task, job)))
            if not ahead:
                break
            job, future = ahead.popleft()
            in_hand = job  # claimed, in no queue: released if the run stops here
            waited = time.perf_counter()
            try:
                img, size, error, decode_s = future.result()
            except BrokenProcessPool:
                ahead.appendleft((job, future))
                in_hand = None
                raise
            tally.model_wait_s += time.perf_counter() - waited
            if error:
                release(job)
                in_hand = None
                tally.add(Outcome(job.rel, 0, [], error, decode_s=decode_s))
                report()
                continue
            started = time.perf_counter()
            try:
                anns = backend(img)
            except Exception as e:  # noqa: BLE001 - reported per image, the run goes on
                release(job)
                in_hand = None
                tally.add(Outcome(job.rel, 0, [], f"{type(e).__name__}: {e}", decode_s=decode_s))
                report()
                continue
            so_far = Outcome(job.rel, 0, [], None, decode_s=decode_s, model_s=time.perf_counter() - started)
            while len(writing) >= 2 * n_write + 1:  # the bounded queue behind the model
                harvest(block=True)
            in_hand = None  # from here on the write queue (or _submit, if the pool is broken) owns the claim
            writing[_submit(writers, job, tally, _write_task, job, anns, size)] = (job, so_far)
            harvest(block=False)
        while writing:
            harvest(block=True)
    except BrokenProcessPool:
        for job, _ in ahead:
            tally.add(Outcome(job.rel, 0, [], WORKER_DIED))
        print(f"\n{WORKER_DIED}: stopping; rerun the same command to make the missing files", file=sys.stderr)
    finally:
        for job, future in ahead:
            future.cancel()
            release(job)
        if in_hand is not None:
            release(in_hand)
        _stop_pools(decoders)
        while writing:  # written files are kept (each write is atomic); then the claims go
            try:
                harvest(block=True)
            except BrokenProcessPool:
                continue
        _stop_pools(writers)
