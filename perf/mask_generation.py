"""Speed of tools/generate_masks.py: the pipeline (decode and write processes around the model)
against the serial loop (--workers 0: read, decode, model, encode, write, one image after another),
on the same synthetic real-size photographs, for each backend; and --max_side against full size.

Writes --images JPEGs of --width x --height (smooth gradients, blurred shapes, texture and noise:
the structure segmenters find in photographs) under --root, runs the tool once per setting in a
fresh masks/ folder, and reports images/s, each stage's seconds per image and the share of the
wall-clock the model stage sat idle (waiting for a decoded image, or for a write, or for the serial
loop's own decode and write):

    python perf/mask_generation.py --root /tmp/maskgen --images 16 --workers 2 --out perf/mask_generation.json
    python perf/mask_generation.py --backends sam --sam_model vit_b --points_per_side 4 ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from run.flags import parse_flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_photo(seed: int, width: int = 1500, height: int = 1000) -> Image.Image:
    """A photograph-like RGB picture: lit gradients, 12-30 blurred ellipses and boxes, a texture and
    sensor noise (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * xx / width + rng.uniform(-60, 60) * yy / height
                      for _ in range(3)], -1)
    img = Image.fromarray(np.clip(light, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 30))):
        x0, y0 = rng.uniform(-0.1, 1) * width, rng.uniform(-0.1, 1) * height
        box = (x0, y0, x0 + rng.uniform(0.03, 0.5) * width, y0 + rng.uniform(0.04, 0.5) * height)
        shape = draw.ellipse if rng.integers(2) else draw.rectangle
        shape(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(2))).astype(np.float32)
    pixels += (10 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9)))[..., None]
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_photo_tree(root: str, images: int, width: int, height: int, classes: int = 4) -> list[str]:
    """<root>/train/<class>/photo_<i>.JPEG (quality 90), kept between runs of the same size."""
    stamp = os.path.join(root, f".photos_{images}_{width}x{height}")
    paths = [os.path.join(root, "train", f"c{i % classes}", f"photo_{i:04d}.JPEG") for i in range(images)]
    if not os.path.exists(stamp):
        shutil.rmtree(os.path.join(root, "train"), ignore_errors=True)
        for i, path in enumerate(paths):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            synthetic_photo(i, width, height).save(path, quality=90)
        open(stamp, "w").close()
    return paths


def run_tool(root: str, args: list[str]) -> dict:
    """One run of tools/generate_masks.py in a fresh masks/ folder; its summary plus the wall-clock."""
    shutil.rmtree(os.path.join(root, "masks"), ignore_errors=True)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_masks.py"), "--data_path", root,
                          "--log_every", "1000", *args], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(f"generate_masks.py {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    out = res.stdout
    summary = json.loads(out[out.index("\n{") + 1:out.rindex("}") + 1])
    return {**summary, "process_wall_s": round(wall, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/mask_generation_bench")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--width", type=int, default=1500)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="the pipeline's worker processes")
    p.add_argument("--backends", nargs="+", default=["superpixels", "sam"], choices=["superpixels", "sam", "sam2"])
    p.add_argument("--sam_model", default="vit_b")
    p.add_argument("--points_per_side", type=int, default=4)
    p.add_argument("--max_side", type=int, default=500, help="also time superpixels on copies of this longer side")
    p.add_argument("--out", default="", help="write the results here as JSON")
    args = parse_flags(p, argv)
    make_photo_tree(args.root, args.images, args.width, args.height)
    print(f"{args.images} photos of {args.width}x{args.height} in {args.root}; {os.cpu_count()} CPUs")
    settings = {"superpixels": ["--backend", "superpixels"],
                "sam": ["--backend", "sam", "--sam_model", args.sam_model, "--random_sam_weights",
                        "--points_per_side", str(args.points_per_side), "--pred_iou_thresh", "0",
                        "--stability_score_thresh", "0"],
                "sam2": ["--backend", "sam2", "--sam_model", "hiera_tiny", "--random_sam_weights",
                         "--points_per_side", str(args.points_per_side), "--pred_iou_thresh", "0",
                         "--stability_score_thresh", "0"]}
    rows = []
    for backend in args.backends:
        runs = [("serial", ["--workers", "0"]), ("pipeline", ["--workers", str(args.workers)])]
        if backend == "superpixels" and args.max_side:
            runs.append((f"pipeline, --max_side {args.max_side}",
                         ["--workers", str(args.workers), "--max_side", str(args.max_side)]))
        for name, extra in runs:
            s = run_tool(args.root, settings[backend] + extra)
            row = {"backend": backend if backend == "superpixels" else f"{backend} {args.sam_model if backend == 'sam' else 'hiera_tiny'}",
                   "run": name, "mode": s["mode"], "images": s["generated"], "images_per_s": s["images_per_s"],
                   "seconds": s["seconds"], "s_per_image": s["s_per_image"],
                   "model_idle_share": s["model_idle_share"], "masks_per_image": round(s["masks_per_image"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| backend | run | images/s | s/image decode, model, encode+write | model stage idle |")
    print("|---|---|---|---|---|")
    for r in rows:
        st = r["s_per_image"]
        print(f"| {r['backend']} | {r['run']} | {r['images_per_s']:.3f} | {st['decode']:.2f}, {st['model']:.2f}, "
              f"{st['write']:.2f} | {100 * r['model_idle_share']:.0f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"images": args.images, "size": [args.width, args.height], "workers": args.workers,
                       "rows": rows}, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
