"""Training-step throughput of an MAE on synthetic tensors: forward, backward and optimizer step,
timed after warm-up. Prints img/s, GFLOP per image (torch.utils.flop_counter), achieved TFLOP/s
and peak GPU memory.

    python perf/throughput.py --model mae_vit_base_patch16 --batch_size 256 --amp bf16 --compile
    python perf/throughput.py --model mae_vit_base_patch16 --ablation        # each option's gain
    python perf/throughput.py --model mae_vit_large_patch16 --max_batch      # with/without checkpointing
    python perf/throughput.py --model mae_vit_base_patch16 --mask_method four_channels --peer
    python perf/throughput.py --model mae_vit_tiny_patch8 --input_size 32 --batch_size 8 --device cpu
    python perf/throughput.py --compare patches segment_tokens segments --device cpu   # interleaved ratios

--ablation starts from the MAE reference's step (fp16 with loss scaling, explicit attention,
for-each AdamW, eager) and adds one option per row: SDPA, bf16, fused AdamW, torch.compile, CUDA
graphs, FP8 (torchao). --peer also times HuggingFace transformers' ViTMAEForPreTraining with the
same configuration in the same process (an optional extra: pip install transformers).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mae  # noqa: E402
from inputs.transforms import as_hw  # noqa: E402
from mask_methods import MASK_METHODS, uses_segments  # noqa: E402
from run.flags import COMPILE_MODES, parse_flags  # noqa: E402
from run.setup import ADAMW_IMPLS, adamw, compile_model, convert_to_fp8, resolve_amp
from util.lr_decay import param_groups_weight_decay  # noqa: E402
from util.misc import LossScaler  # noqa: E402
from util.misc import autocast, mark_step_begin

# --ablation: each row adds one option to the row before
ABLATION = [
    ("reference", "MAE reference: fp16 + loss scaling, explicit attention, for-each AdamW, eager",
     dict(amp="fp16", attention="naive", optimizer="foreach", compile=False, fp8=False)),
    ("sdpa", "+ fused attention (SDPA)", dict(attention="fused")),
    ("bf16", "+ bf16 instead of fp16 (no loss scaling)", dict(amp="bf16")),
    ("fused_adamw", "+ fused AdamW", dict(optimizer="fused")),
    ("compile", "+ torch.compile", dict(compile=True, compile_mode="default")),
    ("cuda_graphs", "+ CUDA graphs (compile mode reduce-overhead)", dict(compile_mode="reduce-overhead")),
    ("fp8", "+ FP8 Linear layers (torchao)", dict(fp8=True)),
]



def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switches timm's attention between F.scaled_dot_product_attention (fused: flash / memory-
    efficient kernels) and the explicit softmax(q k^T) v of the MAE reference. Returns how many
    attention modules were switched."""
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = enabled
            n += 1
    return n


def find_max_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 1 << 14) -> int:
    """Largest batch size b <= limit with fits(b), assuming fits is monotone (if b fits, so does any
    smaller batch): doubles from ``start`` until a batch fails, then bisects. 0 when nothing fits."""
    lo, hi = 0, limit + 1  # lo fits (or is 0); hi does not (or is past the limit)
    b = max(1, min(start, limit))
    while True:
        if not fits(b):
            hi = b
            break
        lo = b
        if b >= limit:
            break
        b = min(2 * b, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def synthetic_batch(batch_size: int, size: tuple[int, int], device, method: str):
    imgs = torch.randn(batch_size, 3, *size, device=device)
    seg = None
    if uses_segments(method):  # a hidden block covering about half of each image
        seg = torch.zeros(batch_size, 1, *size, device=device)
        seg[:, :, : size[0] // 2] = 1
    return imgs, seg


def build_model(cfg, device):
    return models_mae.build_mae(cfg.model, img_size=as_hw(cfg.input_size), mask_method=cfg.mask_method,
                                norm_pix_loss=cfg.norm_pix_loss,
                                grad_checkpointing=cfg.grad_checkpointing).to(device)


def build_step(cfg, device):
    """The training step of configuration ``cfg`` and its inputs."""
    model = build_model(cfg, device)
    set_fused_attention(model, cfg.attention == "fused")
    if cfg.fp8:
        convert_to_fp8(model, device)
    opt = adamw(param_groups_weight_decay(model, 0.05), lr=1e-4, device=device, impl=cfg.optimizer)
    scaler = LossScaler(enabled=cfg.amp == "fp16")
    fwd = compile_model(model, cfg.compile_mode) if cfg.compile else model
    compile_mode = cfg.compile_mode if cfg.compile else None

    def step(x, s):
        mark_step_begin(compile_mode)
        with autocast(device, cfg.amp):
            loss, _, _ = fwd(x, mask_ratio=cfg.mask_ratio, seg_mask=s)
        scaler(loss, opt)
        opt.zero_grad(set_to_none=True)

    return step, synthetic_batch(cfg.batch_size, as_hw(cfg.input_size), device, cfg.mask_method)


def count_flops(cfg, device) -> float:
    """FLOPs per image of forward + backward by torch's flop counter, on the plain eager model
    (the options change the speed, not the arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(cfg, device)
    imgs, seg = synthetic_batch(cfg.batch_size, as_hw(cfg.input_size), device, cfg.mask_method)
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, cfg.amp):
            loss, _, _ = model(imgs, mask_ratio=cfg.mask_ratio, seg_mask=seg)
        loss.backward()
    return float(counter.get_total_flops()) / cfg.batch_size


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


def release(device) -> None:
    """Frees what the previous configuration left (models, compiled graphs, cached memory)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, cfg, device, flops_per_img: float | None) -> dict:
    release(device)
    step, inputs = build_step(cfg, device)
    seconds = time_steps(step, inputs, cfg.warmup, cfg.iters, device)
    del step, inputs
    return report(name, cfg.batch_size / seconds, flops_per_img, device)


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
    release(device)
    model = ViTMAEForPreTraining(cfg).to(device)
    opt = adamw(param_groups_weight_decay(model, 0.05), lr=1e-4, device=device, impl=args.optimizer)
    imgs = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    fwd = compile_model(model, args.compile_mode) if args.compile else model
    scaler = LossScaler(enabled=args.amp == "fp16")

    def step(x):
        mark_step_begin(args.compile_mode if args.compile else None)
        with autocast(device, args.amp):
            loss = fwd(pixel_values=x).loss
        scaler(loss, opt)
        opt.zero_grad(set_to_none=True)

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
    print(", ".join(parts), flush=True)
    return row


def ablation_rows(args, device, flops: float) -> list[dict]:
    """Each option's gain: one row per ABLATION step, every option of the rows above kept."""
    wanted = args.ablation.split(",") if args.ablation != "all" else [key for key, _, _ in ABLATION]
    unknown = set(wanted) - {key for key, _, _ in ABLATION}
    if unknown:
        raise SystemExit(f"--ablation: unknown rows {sorted(unknown)}; choose from "
                         f"{', '.join(key for key, _, _ in ABLATION)} or all")
    cfg, rows, prev = copy.copy(args), [], None
    for key, label, change in ABLATION:
        if key != "reference" and key not in wanted:
            continue  # an option whose row is not asked for stays off
        for k, v in change.items():
            setattr(cfg, k, v)
        if device.type != "cuda" and cfg.amp == "fp16":
            cfg.amp = "none"  # fp16 autocast is CUDA-only; the CPU reference row runs in fp32
        if key not in wanted:
            continue
        row = measure(label, cfg, device, flops)
        row["row"] = key
        row["gain_vs_previous"] = row["img_per_sec"] / prev["img_per_sec"] if prev else None
        rows.append(row)
        prev = row
    print("\n| step | img/s | gain vs row above | TFLOP/s | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        gain = f"{r['gain_vs_previous']:.2f}x" if r["gain_vs_previous"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"| {r['name']} | {r['img_per_sec']:,.0f} | {gain} | {r['tflops']:.1f} | {mem} |")
    return rows


def compare_rows(args, device) -> list[dict]:
    """Step time of each --compare method at the same flags, interleaved (--rounds rounds of every
    method in turn, so drift of the machine's speed affects all alike); medians, and the ratio to
    the first method."""
    import statistics
    steps = {}
    for method in args.compare:
        cfg = copy.copy(args)
        cfg.mask_method = method
        steps[method] = build_step(cfg, device)
        time_steps(*steps[method], warmup=args.warmup, iters=1, device=device)
    times: dict[str, list[float]] = {m: [] for m in args.compare}
    for _ in range(args.rounds):
        for method, (step, inputs) in steps.items():
            times[method].append(time_steps(step, inputs, warmup=1, iters=args.iters, device=device))
    base = statistics.median(times[args.compare[0]])
    rows = []
    print(f"\n| mask method | ms / step (median of {args.rounds}) | ratio to {args.compare[0]} |\n|---|---|---|")
    for method in args.compare:
        ms = statistics.median(times[method]) * 1e3
        rows.append({"name": method, "ms_per_step": ms, "ratio": ms / (base * 1e3),
                     "img_per_sec": args.batch_size / (ms / 1e3), "rounds_ms": [t * 1e3 for t in times[method]]})
        print(f"| {method} | {ms:.1f} | {ms / (base * 1e3):.2f}x |")
    return rows


def max_batch_rows(args, device) -> list[dict]:
    """Largest batch per GPU that trains (2 steps without running out of memory), without and
    with activation checkpointing."""
    rows = []
    for ckpt in (False, True):
        cfg = copy.copy(args)
        cfg.grad_checkpointing = ckpt

        def fits(batch: int) -> bool:
            cfg.batch_size = batch
            release(device)
            try:
                step, inputs = build_step(cfg, device)
                time_steps(step, inputs, warmup=1, iters=1, device=device)
                return True
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # cuBLAS/cuDNN report OOM as RuntimeError
                print(f"  batch {batch} does not train: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                return False
            finally:
                step = inputs = None  # noqa: F841 (frees the memory before the next try)

        best = find_max_batch(fits, start=args.batch_size, limit=args.max_batch_limit)
        rows.append({"name": f"max batch, grad_checkpointing={ckpt}", "grad_checkpointing": ckpt, "max_batch": best})
        print(f"{args.model} {args.mask_method} amp {args.amp}: max batch {best} "
              f"{'with' if ckpt else 'without'} activation checkpointing "
              f"(searched up to {args.max_batch_limit})", flush=True)
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--input_size", type=int, nargs="+", default=[224])
    p.add_argument("--mask_method", default="patches", choices=MASK_METHODS)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--norm_pix_loss", action="store_true")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"])
    p.add_argument("--attention", default="fused", choices=["fused", "naive"],
                   help="fused: scaled_dot_product_attention; naive: softmax(q k^T) v as the reference")
    p.add_argument("--optimizer", default="auto", choices=ADAMW_IMPLS, help="AdamW implementation")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--fp8", action="store_true", help="FP8 Linear layers (torchao)")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peer", action="store_true")
    p.add_argument("--ablation", nargs="?", const="all", default=None, metavar="ROWS",
                   help="time each option's gain: all rows, or a comma list of "
                        + ", ".join(key for key, _, _ in ABLATION) + " (the options of rows not listed "
                        "stay off; the reference's settings are the starting point)")
    p.add_argument("--max_batch", action="store_true",
                   help="find the largest batch that trains, with and without activation checkpointing")
    p.add_argument("--max_batch_limit", type=int, default=8192, help="stop the --max_batch search here")
    p.add_argument("--compare", nargs="+", default=None, choices=MASK_METHODS, metavar="METHOD",
                   help="time these mask methods interleaved in one run and give each one's ratio to the first")
    p.add_argument("--rounds", type=int, default=5, help="--compare: rounds of every method in turn")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv=None) -> list[dict]:
    args = parse_flags(get_args_parser(), argv)
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} {args.mask_method} batch {args.batch_size} input {args.input_size} on {gpu}, "
          f"torch {torch.__version__}", flush=True)
    if args.compare:
        rows = compare_rows(args, device)
    elif args.max_batch:
        rows = max_batch_rows(args, device)
    else:
        flops = count_flops(args, device)
        if args.ablation:
            rows = ablation_rows(args, device, flops)
        else:
            print(f"amp {args.amp}, attention {args.attention}, AdamW {args.optimizer}, compile "
                  f"{args.compile_mode if args.compile else 'off'}, fp8 {args.fp8}, grad checkpointing "
                  f"{args.grad_checkpointing}")
            rows = [measure("ours", args, device, flops)]
        if args.peer:
            peer = measure_peer(args, device)
            if peer:
                rows.append(peer)
                print(f"ratio ours / transformers: {rows[-2]['img_per_sec'] / peer['img_per_sec']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": gpu, "torch": torch.__version__, "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
