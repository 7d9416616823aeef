"""Writes an image tree and its SAM masks as tar shards (the webdataset format) that pretraining
reads with --data_path pointing at the shard folder: for file systems where millions of small
files are slow (one tar read sequentially instead of two files opened per sample).

    python tools/write_shards.py --data_path /datasets/imagenet --out /scratch/imagenet_shards

Each sample is <key>.<image suffix> (the image's bytes as they are), <key>.cls (its class index),
<key>.path (its path under train/) and, when DATA has masks/ in any layout training reads (SAM's
JSON as it is; segmae's table.txt + PNGs and amg.py folders converted to SAM's JSON, the chosen
segment for every coverage ratio unchanged), <key>.json. Samples go into shards in an order drawn
from --seed, so every shard mixes the classes. OUT/shards.json lists the shards with their sample
counts and the class names. SA-1B's own tars need no conversion: point --data_path at them.
Every shard is written atomically; images listed in the original's emptyfiles.txt are left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import scan_image_folder  # noqa: E402
from inputs.roots import image_folder_of  # noqa: E402
from inputs.shards import SHARD_INDEX  # noqa: E402
from run.files import atomic_write, atomic_write_json, remove_stale_temp_files, writable_dir  # noqa: E402
from run.setup import run_tool  # noqa: E402
from sam.layouts import MaskSource, open_mask_source  # noqa: E402
from sam.listing import read_empty_list, stem_of  # noqa: E402
from tools.convert_masks import converted_annotations  # noqa: E402
from util.misc import UserError  # noqa: E402


def mask_json(source: MaskSource, rel: str) -> bytes:
    """The image's masks as a SAM JSON file's bytes: the file itself for the JSON layout."""
    if source.format == "json":
        with open(source.location(rel), "rb") as f:
            return f.read()
    annotations, _ = converted_annotations(source, rel)
    data = {"image": {"file_name": os.path.basename(rel)}, "annotations": annotations}
    if source.format == "segmae":
        data["choice"] = "segmae"  # the original's tie rule travels with its masks
    return json.dumps(data).encode()


def write_shards(data_path: str, out: str, samples_per_shard: int = 1000, seed: int = 0,
                 masks: bool = True, mask_format: str = "auto") -> dict:
    from webdataset import TarWriter
    image_root, not_classes = image_folder_of(data_path)  # data_path/train, or class folders directly inside
    scan = scan_image_folder(image_root, exclude=not_classes)
    listed_empty = read_empty_list(data_path)
    keep = [i for i in range(len(scan.samples)) if os.path.basename(scan.samples.rel(i)) not in listed_empty]
    source = None
    if masks and os.path.isdir(os.path.join(data_path, "masks")):
        stems = {stem_of(scan.samples.rel(i)) for i in keep}
        source = open_mask_source(os.path.join(data_path, "masks"), stems, mask_format, shared_counters=False)
        missing = stems - source.present(stems)
        if missing:
            raise UserError(f"{len(missing)} of {len(stems)} images under {image_root} have no mask file, e.g. "
                            f"{sorted(missing)[0]}: make them (tools/generate_masks.py) or pass --no_masks")
    writable_dir(out, "shard folder")
    remove_stale_temp_files(out)
    order = np.random.default_rng(seed).permutation(np.asarray(keep, np.int64))
    shards, start = [], time.time()
    for first in range(0, len(order), samples_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        chunk = order[first:first + samples_per_shard].tolist()
        with atomic_write(os.path.join(out, name)) as f, TarWriter(f) as writer:  # it leaves f open
            for i in chunk:
                rel, label = scan.samples.rel(i), int(scan.samples.labels[i])
                with open(os.path.join(image_root, rel), "rb") as image:
                    sample = {"__key__": f"{i:09d}", os.path.splitext(rel)[1][1:].lower() or "jpg": image.read(),
                              "cls": str(label), "path": rel}
                if source is not None:
                    sample["json"] = mask_json(source, rel)
                writer.write(sample)
        shards.append({"name": name, "samples": len(chunk)})
        print(f"{out}/{name}: {len(chunk)} samples ({first + len(chunk)}/{len(order)}, {time.time() - start:.0f} s)")
    index = {"shards": shards, "classes": list(scan.classes), "source": os.path.abspath(data_path),
             "masks": source.format if source is not None else None}
    atomic_write_json(os.path.join(out, SHARD_INDEX), index, indent=1)
    return index


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="a root holding train/ or class folders (and masks/ in any layout)")
    p.add_argument("--out", required=True, help="the folder to write the shards and shards.json into")
    p.add_argument("--samples_per_shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the order of the samples across shards")
    p.add_argument("--no_masks", dest="masks", action="store_false", help="leave masks/ out (for --mask_method patches)")
    p.add_argument("--mask_format", default="auto")
    args = p.parse_args(argv)
    if args.samples_per_shard < 1:
        p.error(f"--samples_per_shard must be at least 1, got {args.samples_per_shard}")
    index = write_shards(args.data_path, args.out, args.samples_per_shard, args.seed, args.masks, args.mask_format)
    print(f"{sum(s['samples'] for s in index['shards'])} samples in {len(index['shards'])} shard(s) under {args.out}")
    return index


if __name__ == "__main__":
    run_tool(main)
