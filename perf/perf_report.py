"""Records the speed figures of docs/PERFORMANCE.md in one go and checks them against the targets:
the training step (each option's gain, every mask method), the largest batch with and without
activation checkpointing, and the data loader on both data paths.

    python perf/perf_report.py --out perf/ --parts ablation_b   # ViT-B@256, each option's gain
    python perf/perf_report.py --out perf/ --parts ablation_l   # ViT-L@128
    python perf/perf_report.py --out perf/ --parts methods      # segment methods, ViT-B@256
    python perf/perf_report.py --out perf/ --parts memory       # max batch B/L/H
    python perf/perf_report.py --out perf/ --parts loader --num_workers 16
    python perf/perf_report.py --out /tmp/smoke --smoke         # tiny models on the CPU (tests)

Each part is meant to fit one 10-minute call on a lent H100 (compiling takes a minute per row).

Each part writes <out>/<part>.json and <out>/<part>.md (a markdown table with a target column).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from perf import loader_throughput  # noqa: E402
from perf import throughput  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from tools import build_mask_cache, make_toy_data  # noqa: E402

# the targets on one H100 (img/s at the given batch; GiB: the reference code's best peak memory)
STEP_TARGETS = {("mae_vit_base_patch16", "patches"): (5000, 13.4),
                ("mae_vit_large_patch16", "patches"): (2500, 13.6),
                ("mae_vit_base_patch16", "segments"): (2000, None),
                ("mae_vit_base_patch16", "four_channels"): (2000, None),
                ("mae_vit_base_patch16", "preencoder"): (2000, None)}
LOADER_TARGET_PATCHES = 5000


def plan(args) -> dict:
    """The runs of each part: full sizes, or tiny ones on the CPU with --smoke."""
    if args.smoke:
        tiny = ["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--device", "cpu", "--warmup", "0", "--iters", "1"]
        return {
            "ablation_b": [(("mae_vit_base_patch16", "patches"), tiny + ["--batch_size", "4",
                                                                           "--ablation", "reference,sdpa,fused_adamw"])],
            "ablation_l": [],
            "methods": [(("mae_vit_base_patch16", "four_channels"), tiny + ["--batch_size", "4", "--mask_method",
                                                                              "four_channels"])],
            "memory": [tiny + ["--batch_size", "4", "--max_batch", "--max_batch_limit", "8"]],
            "loader": dict(size=(48, 64), per_class=4, batch=4, steps=2, input_size="32"),
        }
    best = ["--amp", "bf16", "--compile"]
    return {
        "ablation_b": [(("mae_vit_base_patch16", "patches"), ["--model", "mae_vit_base_patch16", "--batch_size",
                                                              "256", "--ablation"])],
        "ablation_l": [(("mae_vit_large_patch16", "patches"), ["--model", "mae_vit_large_patch16", "--batch_size",
                                                               "128", "--ablation"])],
        "methods": [(("mae_vit_base_patch16", m), ["--model", "mae_vit_base_patch16", "--batch_size", "256",
                                                   "--mask_method", m] + best)
                    for m in ("segments", "four_channels", "preencoder")],
        "memory": [["--model", f"mae_vit_{m}", "--batch_size", "256", "--amp", "bf16", "--max_batch"]
                   for m in ("base_patch16", "large_patch16", "huge_patch14")],
        "loader": dict(size=(375, 500), per_class=1000, batch=256, steps=40, input_size="224"),
    }


def check(value: float | None, target: float | None, higher_is_better: bool = True) -> str:
    if target is None or value is None:
        return "-"
    ok = value >= target if higher_is_better else value <= target
    return f"{'met' if ok else 'NOT met'} ({target:,g})"


def step_rows(args, runs: list) -> tuple[list, list[str]]:
    """Training-step runs of perf/throughput.py, the best row of each checked against its target."""
    results, lines = [], ["| model | method | configuration | img/s | gain | TFLOP/s | peak GiB | target img/s | target GiB |",
                          "|---|---|---|---|---|---|---|---|---|"]
    for target_key, argv in runs:
        rows = throughput.main(argv)
        model, method = argv[argv.index("--model") + 1], target_key[1]
        target_speed, target_mem = (None, None) if args.smoke else STEP_TARGETS[target_key]
        best = max(rows, key=lambda r: r["img_per_sec"])
        for r in rows:
            gain = f"{r['gain_vs_previous']:.2f}x" if r.get("gain_vs_previous") else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            is_best = r is best
            lines.append(f"| {model} | {method} | {r['name']} | {r['img_per_sec']:,.0f} | {gain} | {r['tflops']:.1f} | "
                         f"{mem} | {check(r['img_per_sec'], target_speed) if is_best else ''} | "
                         f"{check(r['peak_mem_gib'], target_mem, False) if is_best else ''} |")
        results.append({"model": model, "method": method, "argv": argv, "rows": rows})
    return results, lines


def part_memory(args, runs: dict) -> tuple[list, list[str]]:
    results, lines = [], ["| model | max batch, no checkpointing | max batch, activation checkpointing |", "|---|---|---|"]
    for argv in runs["memory"]:
        rows = throughput.main(argv)
        model = argv[argv.index("--model") + 1]
        lines.append(f"| {model} | {rows[0]['max_batch']} | {rows[1]['max_batch']} |")
        results.append({"model": model, "argv": argv, "rows": rows})
    return results, lines


def part_loader(args, runs: dict) -> tuple[list, list[str]]:
    cfg = runs["loader"]
    data = os.path.join(args.out, "loader_data") if args.loader_data is None else args.loader_data
    if not os.path.isdir(os.path.join(data, "train")):
        make_toy_data.main(["--out", data, "--size", *map(str, cfg["size"]), "--image_format", "jpg",
                            "--train_per_class", str(cfg["per_class"]), "--val_per_class", "1"])
        build_mask_cache.main(["--data_path", data, "--coverage_ratio", "50"])
    results, lines = [], ["| data path | method | samples/s | target |", "|---|---|---|---|"]
    for backend in ("cpu", "gpu"):
        for method in ("patches", "four_channels"):
            r = loader_throughput.main(["--data_path", data, "--mask_method", method, "--batch_size", str(cfg["batch"]),
                                        "--num_workers", str(args.num_workers), "--steps", str(cfg["steps"]),
                                        "--data_backend", backend, "--input_size", cfg["input_size"]]
                                       + (["--device", "cpu"] if args.smoke else []))
            target = LOADER_TARGET_PATCHES if method == "patches" and not args.smoke else None
            lines.append(f"| {backend} | {method} | {r['samples_per_sec']:,.0f} | "
                         f"{check(r['samples_per_sec'], target) if target else 'the step rate of this method'} |")
            results.append(r)
    return results, lines


PARTS = {"ablation_b": lambda args, runs: step_rows(args, runs["ablation_b"]),
         "ablation_l": lambda args, runs: step_rows(args, runs["ablation_l"]),
         "methods": lambda args, runs: step_rows(args, runs["methods"]),
         "memory": part_memory, "loader": part_loader}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for <part>.json and <part>.md")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="loader workers")
    p.add_argument("--loader_data", default=None,
                   help="dataset for the loader part (default: a JPEG toy set of ImageNet size made in --out)")
    p.add_argument("--smoke", action="store_true", help="tiny models and data on the CPU: checks the tool itself")
    args = parse_flags(p, argv)
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    os.makedirs(args.out, exist_ok=True)
    runs, report = plan(args), {}
    for part in parts:
        results, lines = PARTS[part](args, runs)
        with open(os.path.join(args.out, f"{part}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{part}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        report[part] = results
    return report


if __name__ == "__main__":
    main()
