"""Memory and build time of the pretraining dataset against torchvision's ImageFolder, at scale.

On a synthetic tree (--images tiny real JPEGs in --classes class folders, one SAM JSON mask each),
each dataset is built in a fresh process, timed, and then read for one full epoch (every index,
shuffled) by a forked child, as a data-loader worker would. Reported per dataset:

    build s        seconds from nothing to the built dataset (the scan and every start-up check)
    rank MiB       the building process's resident memory grown by the build (held by every rank)
    worker MiB     a worker's private memory after one full epoch minus after its first 1000 samples
                   (read in file order, so they touch little of the metadata; the rest is shuffled):
                   the pages the worker copied because it touched per-image Python objects
                   (copy-on-access: reading an object writes its reference count)

and the projection to 1.28M images on a node of 8 ranks x 10 workers (every cost is linear in N):
    node GiB = 8 x (rank MiB + 10 x worker MiB) x 1.28M / N.

    python perf/loader_memory.py --images 200000 --root /tmp/loader_memory_200k --repeats 3
    python perf/loader_memory.py ... --cold     # the page cache dropped before each build (root only)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from torchvision.datasets import ImageFolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import inputs.roots  # noqa: E402
from inputs.pretrain import SegmentMaskImageFolder  # noqa: E402
from perf.dataset_startup import tiny_sample  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from sam.cache import MaskCache, build_mask_cache  # noqa: E402
from sam.files import MASK_SUFFIX  # noqa: E402

KINDS = {"imagefolder": "torchvision ImageFolder", "patches": "patches", "json": "json masks",
         "cache": "+ mask cache, restart, first rank", "cache-rank": "+ mask cache, restart, other ranks"}
IMAGENET = 1_281_167
RANKS, WORKERS = 8, 10
FIRST = 1000  # samples read before the first measurement: the worker's own start-up allocations


def build_tree(root: str, images: int, classes: int) -> None:
    """train/<class>/<i>.JPEG and masks/<class>/<i>.json; kept between runs once complete."""
    done = os.path.join(root, f".complete-{images}-{classes}")
    if os.path.exists(done):
        return
    jpeg, _, ann = tiny_sample()
    json_bytes = json.dumps({"image": {}, "annotations": [ann]}).encode()
    per_class = -(-images // classes)
    for c in range(classes):
        name = f"n{c:08d}"
        for sub in ("train", "masks"):
            os.makedirs(os.path.join(root, sub, name), exist_ok=True)
        for i in range(min(per_class, images - c * per_class)):
            with open(os.path.join(root, "train", name, f"{name}_{i}.JPEG"), "wb") as f:
                f.write(jpeg)
            with open(os.path.join(root, "masks", name, f"{name}_{i}{MASK_SUFFIX}"), "wb") as f:
                f.write(json_bytes)
    open(done, "w").close()


def private_kib() -> int:
    """This process's private memory (clean + dirty pages), KiB."""
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def cache_root(root: str) -> str:
    """The tree again (train/ and masks/ linked) with a mask cache: the other kinds read masks/."""
    return os.path.join(root, "with_cache")


def build_cache_tree(root: str) -> None:
    linked = cache_root(root)
    os.makedirs(linked, exist_ok=True)
    for sub in ("train", "masks"):
        if not os.path.lexists(os.path.join(linked, sub)):
            os.symlink(os.path.join(os.path.abspath(root), sub), os.path.join(linked, sub))
    if not MaskCache.exists(linked, 50.0):
        rels = SegmentMaskImageFolder(linked, with_masks=True, coverage_ratio=50.0).rel_paths
        build_mask_cache(linked, rels, 50.0, workers=os.cpu_count() or 1)


def make_dataset(kind: str, root: str):
    if kind == "imagefolder":
        return ImageFolder(os.path.join(root, "train"))
    if kind.startswith("cache"):
        if kind == "cache-rank":  # a node's other ranks: its first rank checked the cache against masks/
            inputs.roots.first_rank_on_node = lambda: False
        return SegmentMaskImageFolder(cache_root(root), with_masks=True, coverage_ratio=50.0)
    return SegmentMaskImageFolder(root, with_masks=kind.startswith("json"), coverage_ratio=50.0)


def child(kind: str, root: str) -> dict:
    """Build, then one epoch in a forked worker; the numbers as a dict."""
    before = rss_kib()
    start = time.perf_counter()
    dataset = make_dataset(kind, root)
    build_s = time.perf_counter() - start
    rank_kib = rss_kib() - before
    # the first FIRST in file order (they touch few pages of the metadata), then the rest shuffled;
    # one numpy array (a list of ints would itself be copied by the worker, as a sampler's is not)
    order = np.arange(len(dataset))
    np.random.default_rng(0).shuffle(order[FIRST:])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read)
        for i in order[:FIRST]:
            dataset[int(i)]
        first = private_kib()
        for i in order[FIRST:]:
            dataset[int(i)]
        os.write(write, json.dumps({"worker_kib": private_kib() - first}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        worker = json.loads(f.read())
    os.waitpid(pid, 0)
    return {"images": len(dataset), "build_s": build_s, "rank_kib": rank_kib, **worker}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--root", default="/tmp/loader_memory", help="where the synthetic tree is written (kept)")
    p.add_argument("--repeats", type=int, default=3, help="runs per dataset, interleaved; medians reported")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each build (writes /proc/sys/vm/drop_caches: root only)")
    p.add_argument("--child", choices=list(KINDS), help=argparse.SUPPRESS)
    args = parse_flags(p, argv)
    if args.child:
        print(json.dumps(child(args.child, args.root)))
        return {}
    start = time.time()
    build_tree(args.root, args.images, args.classes)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "patches", "--root", args.root],
                   capture_output=True, check=True, cwd=REPO)  # a warm page cache for every kind
    if any(k.startswith("cache") for k in args.kinds):
        build_cache_tree(args.root)
    print(f"tree of {args.images} images ready in {time.time() - start:.0f}s", file=sys.stderr)
    runs: dict[str, list[dict]] = {k: [] for k in args.kinds}
    for _ in range(args.repeats):
        for kind in args.kinds:
            if args.cold:
                subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--root", args.root],
                                 capture_output=True, text=True, check=True, cwd=REPO)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    scale = IMAGENET / args.images
    table = {}
    for kind, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("build_s", "rank_kib", "worker_kib")}
        node_gib = RANKS * (med["rank_kib"] + WORKERS * med["worker_kib"]) * scale / 2 ** 20
        table[kind] = {**med, "images": rs[0]["images"], "node_gib_at_1.28M": node_gib,
                       "build_s_at_1.28M": med["build_s"] * scale}
    ref = table.get("imagefolder")
    print(f"{args.images} images, {args.classes} classes, median of {args.repeats}; projected to {IMAGENET} images, "
          f"{RANKS} ranks x {WORKERS} workers per node")
    print(f"{'dataset':<32} {'build s':>8} {'rank MiB':>9} {'worker MiB':>11} {'build@1.28M':>12} "
          f"{'node GiB@1.28M':>15}" + ("  vs ImageFolder (build, worker)" if ref else ""))
    for kind, row in table.items():
        vs = (f"  {row['build_s'] / ref['build_s']:.2f}x, {row['worker_kib'] / max(ref['worker_kib'], 1):.3f}x"
              if ref else "")
        print(f"{KINDS[kind]:<32} {row['build_s']:>8.2f} {row['rank_kib'] / 1024:>9.1f} {row['worker_kib'] / 1024:>11.1f} "
              f"{row['build_s_at_1.28M']:>11.1f}s {row['node_gib_at_1.28M']:>15.2f}{vs}")
    return table


if __name__ == "__main__":
    main()
