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

A rerun into the same folder leaves exactly its own shards: the shards an earlier run listed there
and this one does not write are removed, and a folder holding any other .tar file is refused
before anything is written (training reads a folder with shards.json by that list only). While a
run writes, shards.json says so and names every file it may leave, so a killed run is finished or
cleaned up by the next one, and training refuses the folder until then.
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
from inputs.images import DataError  # noqa: E402
from inputs.roots import image_folder_of  # noqa: E402
from inputs.shards import SHARD_INDEX, read_shard_index  # noqa: E402
from run.files import atomic_write, atomic_write_json, remove_stale_temp_files, writable_dir  # noqa: E402
from run.flags import parse_flags  # noqa: E402
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
    # what the masks were made from travels with them: the frame of amg.py's masks (the displayed
    # picture, sam/geometry.py), the original's tie rule for segmae's
    data = {"image": {"file_name": os.path.basename(rel)}, "annotations": annotations,
            "generator": {"converted_from": source.format}}
    if source.format == "segmae":
        data["choice"] = "segmae"
    return json.dumps(data).encode()


def own_shards(out: str) -> set[str]:
    """The shard files an earlier run of this writer left in ``out`` (listed in its shards.json,
    finished or not); any other .tar file there is an error naming it."""
    try:
        index = read_shard_index(out, writing=True)
    except DataError as e:
        raise UserError(f"--out {out}: {e}") from None
    own = {entry["name"] for entry in index["shards"]} if index is not None else set()
    others = sorted(name for name in os.listdir(out) if name.endswith(".tar") and name not in own)
    if others:
        raise UserError(f"--out {out} holds {len(others)} .tar file(s) that no earlier tools/write_shards.py run into "
                        f"it wrote, e.g. {others[0]}: pass an empty folder (or remove them)")
    return own


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
    earlier = own_shards(out)
    order = np.random.default_rng(seed).permutation(np.asarray(keep, np.int64))
    names = [f"shard-{k:06d}.tar" for k in range(-(-len(order) // samples_per_shard))]
    # first, the folder says a write is under way and which files it may leave (a killed run's too)
    atomic_write_json(os.path.join(out, SHARD_INDEX), {"incomplete": True, "writing": sorted(earlier | set(names))})
    shards, start = [], time.time()
    for first in range(0, len(order), samples_per_shard):
        name = names[len(shards)]
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
    for name in sorted(earlier - set(names)):  # an earlier run's shards this run did not rewrite
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
            print(f"removed {out}/{name}, left by an earlier run into this folder")
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
    args = parse_flags(p, argv)
    if args.samples_per_shard < 1:
        p.error(f"--samples_per_shard must be at least 1, got {args.samples_per_shard}")
    index = write_shards(args.data_path, args.out, args.samples_per_shard, args.seed, args.masks, args.mask_format)
    print(f"{sum(s['samples'] for s in index['shards'])} samples in {len(index['shards'])} shard(s) under {args.out}")
    return index


if __name__ == "__main__":
    run_tool(main)
