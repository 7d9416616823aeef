"""Steady-state samples/s of the real pretraining loader (image + mask file -> augmented batch on
the device), measured after the prefetch buffers are drained so they do not count.

    python perf/loader_throughput.py --data_path /datasets/imagenet --mask_method four_channels \\
        --batch_size 256 --num_workers 16 --steps 200 [--data_backend gpu]

--data_backend gpu: the workers only read the files (and crop the masks); decoding (nvjpeg),
cropping and resizing happen on the device, as in main_pretrain.py --data_backend gpu.
--data_path may name tar shards (tools/write_shards.py, SA-1B's tars), read as main_pretrain.py reads them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.pretrain import build_pretrain_dataset, build_pretrain_transform, collate_pretrain  # noqa: E402
from inputs.shards import is_shard_path  # noqa: E402
from inputs.shards import DEFAULT_SHUFFLE_BUFFER, build_shard_dataset  # noqa: E402
from inputs.transforms import DATA_BACKENDS, as_hw  # noqa: E402
from mask_methods import MASK_METHODS, uses_segments  # noqa: E402
from run.files import atomic_write_json  # noqa: E402
from run.flags import parse_flags  # noqa: E402


def measure(args) -> dict:
    device = torch.device(args.device)
    transform = build_pretrain_transform(as_hw(args.input_size), args.data_backend)
    shards = is_shard_path(args.data_path[0])
    if shards:
        dataset = build_shard_dataset(args.data_path, transform, uses_segments(args.mask_method), args.coverage_ratio,
                                      args.batch_size, 1, 0, 0, DEFAULT_SHUFFLE_BUFFER, False, decode=True)
    else:
        dataset = build_pretrain_dataset(args.data_path, transform,
                                         with_masks=uses_segments(args.mask_method), coverage_ratio=args.coverage_ratio)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         shuffle=None if shards else True, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0, collate_fn=collate_pretrain,
                                         prefetch_factor=2 if args.num_workers > 0 else None)
    # skip the start-up and the prefetched batches, then time a window of steps
    skip = args.num_workers * 2 + 2
    seen, timed, start, it = 0, 0, None, iter(loader)
    while timed < args.steps:
        try:
            imgs, masks, _ = next(it)
        except StopIteration:
            dataset.set_epoch(dataset.epoch + 1)
            it = iter(loader)
            continue
        imgs = imgs.to(device, non_blocking=True)
        if masks is not None:
            masks = masks.to(device, non_blocking=True)
        seen += 1
        if seen == skip:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        elif seen > skip:
            timed += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"samples_per_sec": timed * args.batch_size / elapsed, "steps": timed, "batch_size": args.batch_size,
              "num_workers": args.num_workers, "mask_method": args.mask_method, "data_backend": args.data_backend,
              "data_format": "shards" if shards else "folders"}
    print(f"{result['samples_per_sec']:,.1f} samples/s over {timed} steps of {args.batch_size} "
          f"({args.num_workers} workers, {args.mask_method}, data_backend {args.data_backend}, {result['data_format']})")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", nargs="+", required=True)
    p.add_argument("--mask_method", default="four_channels", choices=MASK_METHODS)
    p.add_argument("--coverage_ratio", type=float, default=50.0)
    p.add_argument("--input_size", type=int, nargs="+", default=[224])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=10)
    p.add_argument("--steps", type=int, default=100, help="timed steps after the warm-up")
    p.add_argument("--data_backend", default="cpu", choices=DATA_BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = parse_flags(p, argv)
    result = measure(args)
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    main()
