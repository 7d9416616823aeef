"""What the frozen-encoder probe (evals.probe) costs next to the Segmenter (segmenter.train), per
training image and for a whole ADE20k evaluation: seconds per 1,000 training images measured here
(random images of the real crop, after a warm-up step), FLOPs per training image counted by
torch.utils.flop_counter (forward and backward of one step), and both projected to the full ADE20k
(20,210 training images, each recipe's epochs) on one GPU at an assumed achieved rate.

    python perf/probe_cost.py --backbone vit_base_patch16 --crop-size 512 --device cpu
    python perf/probe_cost.py --backbone vit_base_patch16 --crop-size 512 --device cuda --amp bf16

The probe's encoder is frozen (no gradient: its step is one encoder forward and a linear head);
the Segmenter trains the whole encoder and its mask-transformer decoder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evals.probe import ProbeHead  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from segmenter.data import ADE20K_CLASSES  # noqa: E402
from segmenter.model import BACKBONES, build_segmenter  # noqa: E402
from util.misc import autocast  # noqa: E402

ADE20K_TRAIN_IMAGES = 20210


def build(kind: str, backbone: str, crop: int, device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model as each evaluation trains it, and its optimizer over what it trains."""
    decoder = "linear" if kind == "probe" else "mask_transformer"
    model = build_segmenter(backbone, decoder, ADE20K_CLASSES, crop, drop_path_rate=0.0 if kind == "probe" else 0.1)
    if kind == "probe":
        model.encoder.requires_grad_(False)
        model.decoder = ProbeHead(ADE20K_CLASSES, model.encoder.embed_dim)
    model.to(device).train()
    if kind == "probe":
        model.encoder.eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trained, lr=1e-4)


def step(model, optimizer, img, label, device, amp) -> None:
    with autocast(device, amp):
        logits = model(img)
    loss = nn.functional.cross_entropy(logits.float(), label)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(kind: str, args, device) -> dict:
    model, optimizer = build(kind, args.backbone, args.crop_size, device)
    img = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    label = torch.randint(0, ADE20K_CLASSES, (args.batch_size, args.crop_size, args.crop_size), device=device)
    with FlopCounterMode(display=False) as counter:
        step(model, optimizer, img, label, device, args.amp)  # also the warm-up
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, optimizer, img, label, device, args.amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_image = statistics.median(times) / args.batch_size
    return {"kind": kind, "seconds_per_1000": 1000 * per_image,
            "gflop_per_image": counter.get_total_flops() / args.batch_size / 1e9}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_base_patch16", choices=BACKBONES)
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (median)")
    p.add_argument("--probe-epochs", type=int, default=4, help="evals.probe's default")
    p.add_argument("--seg-epochs", type=int, default=64, help="segmenter.train's default")
    p.add_argument("--gpu-tflops", type=float, default=400.0,
                   help="achieved TFLOP/s assumed for the projection (H100 bf16: ~40%% of its dense peak)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"])
    args = parse_flags(p, argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = [measure(kind, args, device) for kind in ("probe", "segmenter")]
    epochs = {"probe": args.probe_epochs, "segmenter": args.seg_epochs}
    print(f"{args.backbone}, crop {args.crop_size}, batch {args.batch_size}, {args.device}, amp {args.amp}; "
          f"projection: {ADE20K_TRAIN_IMAGES} training images, {args.gpu_tflops:g} TFLOP/s achieved")
    print("| evaluation | s / 1,000 training images here | GFLOP / training image | epochs | "
          "full ADE20k training, one GPU (projected) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        images = ADE20K_TRAIN_IMAGES * epochs[r["kind"]]
        r["projected_gpu_minutes"] = images * r["gflop_per_image"] / (args.gpu_tflops * 1e3) / 60
        print(f"| {r['kind']} | {r['seconds_per_1000']:.0f} | {r['gflop_per_image']:.0f} | {epochs[r['kind']]} | "
              f"{r['projected_gpu_minutes']:.1f} min |")
    ratio = rows[1]["seconds_per_1000"] / rows[0]["seconds_per_1000"]
    print(f"a Segmenter training image costs {ratio:.1f}x a probe training image here; a whole Segmenter run "
          f"{rows[1]['projected_gpu_minutes'] / rows[0]['projected_gpu_minutes']:.0f}x a whole probe")
    return rows


if __name__ == "__main__":
    main()
