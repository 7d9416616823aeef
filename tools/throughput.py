"""Training-step throughput of an MAE on synthetic tensors: forward, backward and optimizer step,
timed after warm-up. Prints img/s, GFLOP per image (torch.utils.flop_counter), achieved TFLOP/s
and peak GPU memory.

    python tools/throughput.py --model mae_vit_base_patch16 --batch_size 256 --amp bf16 --compile
    python tools/throughput.py --model mae_vit_base_patch16 --mask_method four_channels --peer
    python tools/throughput.py --model mae_vit_tiny_patch8 --input_size 32 --batch_size 8 --device cpu

--peer also times HuggingFace transformers' ViTMAEForPreTraining with the same configuration in
the same process (an optional extra: pip install transformers) and prints the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mae  # noqa: E402
from util.masking import MASK_METHODS  # noqa: E402
from util.misc import autocast, resolve_amp  # noqa: E402
from util.optim import adamw, param_groups_weight_decay  # noqa: E402
from util.transforms import as_hw  # noqa: E402


def synthetic_batch(batch_size: int, size: tuple[int, int], device, method: str):
    imgs = torch.randn(batch_size, 3, *size, device=device)
    seg = None
    if method != "patches":  # a hidden block covering about half of each image
        seg = torch.zeros(batch_size, 1, *size, device=device)
        seg[:, :, : size[0] // 2] = 1
    return imgs, seg


def count_flops(step, *inputs) -> float:
    """FLOPs of one call of step(*inputs) (forward + backward), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step(*inputs)
    return float(counter.get_total_flops())


def time_steps(step, inputs, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        step(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure_ours(args, device) -> dict:
    size = as_hw(args.input_size)
    model = models_mae.build_mae(args.model, img_size=size, mask_method=args.mask_method,
                                 norm_pix_loss=args.norm_pix_loss,
                                 **({"grad_checkpointing": True} if args.grad_checkpointing else {})).to(device)
    opt = adamw(param_groups_weight_decay(model, 0.05), lr=1e-4, device=device)
    imgs, seg = synthetic_batch(args.batch_size, size, device, args.mask_method)
    fwd = torch.compile(model) if args.compile else model

    def step(x, s):
        with autocast(device, args.amp):
            loss, _, _ = fwd(x, mask_ratio=args.mask_ratio, seg_mask=s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(lambda x, s: _fwd_bwd(model, x, s, args, device), imgs, seg) / args.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, (imgs, seg), args.warmup, args.iters, device)
    return report("ours", args.batch_size / seconds, flops, device)


def _fwd_bwd(model, x, s, args, device):
    with autocast(device, args.amp):
        loss, _, _ = model(x, mask_ratio=args.mask_ratio, seg_mask=s)
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure_peer(args, device) -> dict | None:
    """HuggingFace transformers' ViTMAEForPreTraining, same sizes (patches method only)."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError:
        print("--peer needs HuggingFace transformers: pip install transformers")
        return None
    with torch.device("meta"):  # only the shapes are needed
        ref = models_mae.build_mae(args.model, img_size=as_hw(args.input_size))
    blk, dec_blk = ref.blocks[0], ref.decoder_blocks[0]
    cfg = ViTMAEConfig(hidden_size=ref.cls_token.shape[-1], num_hidden_layers=len(ref.blocks),
                       num_attention_heads=blk.attn.num_heads, intermediate_size=blk.mlp.fc1.out_features,
                       image_size=as_hw(args.input_size)[0], patch_size=ref.patch_size,
                       decoder_hidden_size=ref.decoder_embed.out_features,
                       decoder_num_hidden_layers=len(ref.decoder_blocks),
                       decoder_num_attention_heads=dec_blk.attn.num_heads,
                       decoder_intermediate_size=dec_blk.mlp.fc1.out_features,
                       mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, attn_implementation="sdpa")
    model = ViTMAEForPreTraining(cfg).to(device)
    opt = adamw(param_groups_weight_decay(model, 0.05), lr=1e-4, device=device)
    imgs = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    fwd = torch.compile(model) if args.compile else model

    def step(x):
        with autocast(device, args.amp):
            loss = fwd(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, (imgs,), args.warmup, args.iters, device)
    return report("transformers ViTMAE", args.batch_size / seconds, None, device)


def report(name: str, img_per_sec: float, flops_per_img: float | None, device) -> dict:
    row = {"name": name, "img_per_sec": img_per_sec,
           "gflop_per_img": flops_per_img / 1e9 if flops_per_img else None,
           "tflops": img_per_sec * flops_per_img / 1e12 if flops_per_img else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None}
    parts = [f"{name}: {img_per_sec:,.1f} img/s"]
    if flops_per_img:
        parts.append(f"{row['gflop_per_img']:.1f} GFLOP/img, {row['tflops']:.2f} TFLOP/s")
    if row["peak_mem_gib"] is not None:
        parts.append(f"peak {row['peak_mem_gib']:.1f} GiB")
    print(", ".join(parts))
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--input_size", type=int, nargs="+", default=[224])
    p.add_argument("--mask_method", default="patches", choices=MASK_METHODS)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--norm_pix_loss", action="store_true")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peer", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{args.model} {args.mask_method} batch {args.batch_size} amp {args.amp} compile {args.compile} "
          f"on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    rows = [measure_ours(args, device)]
    if args.peer:
        peer = measure_peer(args, device)
        if peer:
            rows.append(peer)
            print(f"ratio ours / transformers: {rows[0]['img_per_sec'] / peer['img_per_sec']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
