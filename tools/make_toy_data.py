"""Writes small deterministic datasets in the real on-disk formats: an ImageNet-style pretraining
set with SAM masks, (with --ade20k_out) a toy ADE20k for the Segmenter and (with --lmdb_out) a
toy text-line LMDB in the text-recognition layout (num-samples, image-%09d, label-%09d).

    <out>/train/<class>/<name>.png, <out>/val/<class>/<name>.png
    <out>/masks/<class>/<name>.json   SA-1B-style SAM masks (COCO RLE via pycocotools)

Each image shows shapes of its class (discs, boxes, triangles or stripes) on a textured
background; its mask file holds several overlapping segments of very different areas (each shape,
the background, all shapes together, image halves), as SAM's automatic generator gives. Every
fifth mask file is a bare annotation list instead of the SA-1B dict, as SAM's own script writes.

    python tools/make_toy_data.py --out data/toy --ade20k_out data/toy_ade20k
    python tools/make_toy_data.py --out "" --lmdb_out data/toy_lines_lmdb
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from run.flags import parse_flags  # noqa: E402
from sam.files import encode_segmentation, write_mask_file  # noqa: E402

CLASSES = ("discs", "boxes", "triangles", "stripes")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "discs":
        draw.ellipse(box, fill=fill)
    elif kind == "boxes":
        draw.rectangle(box, fill=fill)
    elif kind == "triangles":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # stripes: a striped patch
        step = max(2, (x1 - x0) // 5)
        for x in range(x0, x1, 2 * step):
            draw.rectangle((x, y0, min(x + step - 1, x1), y1), fill=fill)


def make_sample(rng: np.random.RandomState, kind: str, height: int, width: int):
    """Returns (RGB uint8 image, list of binary segment masks)."""
    base = rng.randint(40, 200, size=3)
    noise = rng.randint(-25, 26, size=(height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    wave = (12 * np.sin(xx / rng.uniform(2, 6)) * np.cos(yy / rng.uniform(2, 6)))[..., None]
    img = np.clip(base + noise + wave, 0, 255).astype(np.uint8)

    canvas = Image.fromarray(img)
    segments = []
    union = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.randint(1, 4)):
        side = rng.randint(min(height, width) // 4, min(height, width) * 3 // 4)
        x0 = rng.randint(0, width - side)
        y0 = rng.randint(0, height - side)
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        colour = tuple(int(c) for c in rng.randint(0, 256, size=3))
        _draw_shape(ImageDraw.Draw(canvas), kind, box, colour)
        shape_mask = Image.new("L", (width, height), 0)
        _draw_shape(ImageDraw.Draw(shape_mask), kind, box, 1)
        m = np.asarray(shape_mask, dtype=np.uint8)
        segments.append(m)
        union |= m
    segments.append(union)
    segments.append(1 - union)  # background
    top = np.zeros((height, width), dtype=np.uint8)
    top[: height // 2] = 1
    left = np.zeros((height, width), dtype=np.uint8)
    left[:, : width // 3] = 1
    segments += [top, left]
    return np.asarray(canvas), [s for s in segments if s.any()]


def annotation(seg: np.ndarray, ann_id: int, rng: np.random.RandomState) -> dict:
    ys, xs = np.nonzero(seg)
    return {
        "id": ann_id,
        "segmentation": encode_segmentation(seg),
        "area": int(seg.sum()),
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        "predicted_iou": float(rng.uniform(0.85, 1.0)),
        "stability_score": float(rng.uniform(0.9, 1.0)),
        "point_coords": [[float(xs.mean()), float(ys.mean())]],
        "crop_box": [0, 0, seg.shape[1], seg.shape[0]],
    }


def write_segmae_masks(folder: str, segments: list[np.ndarray], coverages: list[float] | None = None) -> None:
    """The original segmae code's layout: folder/table.txt, one '<coverage percent> <png>' line
    per segment sorted by coverage, and binary 'L' PNGs (255 = segment)."""
    os.makedirs(folder, exist_ok=True)
    coverages = coverages or [100.0 * s.sum() / s.size for s in segments]
    lines = []
    for i in sorted(range(len(segments)), key=lambda k: coverages[k]):
        Image.fromarray((segments[i] > 0).astype(np.uint8) * 255, mode="L").save(os.path.join(folder, f"{i}.png"))
        lines.append(f"{coverages[i]:.4f} {i}.png")
    with open(os.path.join(folder, "table.txt"), "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))


def write_amg_masks(folder: str, annotations: list[dict], segments: list[np.ndarray]) -> None:
    """segment-anything's scripts/amg.py default output: folder/<i>.png (mask * 255) and
    metadata.csv with its header and one row per mask."""
    os.makedirs(folder, exist_ok=True)
    rows = ["id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
            "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"]
    for i, (ann, seg) in enumerate(zip(annotations, segments)):
        Image.fromarray((seg > 0).astype(np.uint8) * 255, mode="L").save(os.path.join(folder, f"{i}.png"))
        values = [i, ann["area"], *ann["bbox"], *ann["point_coords"][0], ann["predicted_iou"],
                  ann["stability_score"], *ann["crop_box"]]
        rows.append(",".join(str(v) for v in values))
    with open(os.path.join(folder, "metadata.csv"), "w") as f:
        f.write("\n".join(rows))


def write_masks_in_layout(mask_root: str, stem: str, segments: list[np.ndarray], annotations: list[dict],
                          mask_format: str, **json_kwargs) -> None:
    """One image's masks under mask_root in the json, segmae or amg layout."""
    if mask_format == "json":
        write_mask_file(os.path.join(mask_root, stem + ".json"), annotations, **json_kwargs)
    elif mask_format == "segmae":
        write_segmae_masks(os.path.join(mask_root, stem), segments)
    elif mask_format == "amg":
        write_amg_masks(os.path.join(mask_root, stem), annotations, segments)
    else:
        raise ValueError(f"unknown mask format {mask_format!r}")


def make_toy_dataset(out: str, train_per_class: int = 24, val_per_class: int = 6, height: int = 64,
                     width: int = 64, seed: int = 0, classes=CLASSES, image_format: str = "png",
                     mask_format: str = "json") -> str:
    """ImageNet-style folders with SAM-style masks (``mask_format``: json, or the segmae / amg.py
    folder layouts); ``image_format`` png (lossless) or jpg (quality 90, like ImageNet: for loader
    benchmarks)."""
    rng = np.random.RandomState(seed)
    ext = {"png": ".png", "jpg": ".jpg"}[image_format]
    image_id = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for kind in classes:
            os.makedirs(os.path.join(out, split, kind), exist_ok=True)
            for i in range(per_class):
                name = f"{kind}_{split}_{i:04d}"
                img, segments = make_sample(rng, kind, height, width)
                Image.fromarray(img).save(os.path.join(out, split, kind, name + ext), quality=90)
                if split != "train":
                    continue
                annotations = [annotation(s, k, rng) for k, s in enumerate(segments)]
                info = {"image_id": image_id, "width": width, "height": height, "file_name": name + ext}
                # every fifth JSON file is a bare list, the form SAM's amg.py script writes with --convert-to-rle
                write_masks_in_layout(os.path.join(out, "masks", kind), name, segments, annotations, mask_format,
                                      image_info=info, bare_list=image_id % 5 == 4)
                image_id += 1
    return out


# toy ADE20k: label -> colour; 0 ("other", ignored in training) is a thin frame
ADE_TOY_CLASSES = {1: (120, 120, 120), 3: (40, 160, 40), 5: (200, 60, 60), 13: (60, 80, 210),
                   21: (230, 200, 40), 40: (160, 60, 200)}


def make_ade_sample(rng: np.random.RandomState, height: int, width: int):
    """(RGB image, label map): a background class and 2-4 shapes of other classes, each class with
    its own colour and a noisy texture, so that a pixel's class can be learned from its looks."""
    labels = list(ADE_TOY_CLASSES)
    background = labels[rng.randint(len(labels))]
    label = np.full((height, width), background, dtype=np.uint8)
    canvas = Image.fromarray(label)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(2, 5)):
        cls = labels[rng.randint(len(labels))]
        h = rng.randint(height // 4, height * 2 // 3)
        w = rng.randint(width // 4, width * 2 // 3)
        y0, x0 = rng.randint(0, height - h), rng.randint(0, width - w)
        kind = ("discs", "boxes", "triangles")[rng.randint(3)]
        _draw_shape(draw, kind, (x0, y0, x0 + w - 1, y0 + h - 1), int(cls))
    label = np.array(canvas)
    label[:2], label[-2:], label[:, :2], label[:, -2:] = 0, 0, 0, 0
    colours = np.zeros((256, 3), dtype=np.int64)
    for cls, colour in ADE_TOY_CLASSES.items():
        colours[cls] = colour
    colours[0] = (0, 0, 0)
    img = colours[label] + rng.randint(-30, 31, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_toy_ade20k(out: str, n_train: int = 40, n_val: int = 10, height: int = 64, width: int = 96,
                    seed: int = 0) -> str:
    """ADEChallengeData2016 layout: images/{training,validation}/*.jpg, annotations/.../*.png."""
    rng = np.random.RandomState(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        os.makedirs(os.path.join(out, "annotations", split), exist_ok=True)
        for i in range(n):
            # alternate portrait and landscape, as real photos come
            h, w = (height, width) if i % 2 == 0 else (width, height)
            img, label = make_ade_sample(rng, h, w)
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            Image.fromarray(img).save(os.path.join(out, "images", split, name + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(out, "annotations", split, name + ".png"))
    return out


WORDS = ("mask", "auto", "encoder", "segment", "anything", "vision", "text", "line", "patch", "token")


def make_toy_text_lmdb(out: str, n: int = 64, height: int = 32, width: int = 128, seed: int = 0) -> str:
    """An LMDB of n JPEG text lines (a word or two in a random shade on a noisy background), keys
    num-samples, image-%09d and label-%09d from 1, as text-recognition data sets store them."""
    import io

    import lmdb
    rng = np.random.RandomState(seed)
    os.makedirs(out, exist_ok=True)
    env = lmdb.open(out, map_size=max(64 << 20, n * 64 << 10))
    with env.begin(write=True) as txn:
        for i in range(1, n + 1):
            words = " ".join(rng.choice(WORDS, size=rng.randint(1, 3)))
            background = rng.randint(150, 256, size=(height, width, 3)).astype(np.uint8)
            img = Image.fromarray(background)
            ImageDraw.Draw(img).text((int(rng.randint(2, 12)), int(rng.randint(4, max(5, height - 14)))), words,
                                     fill=tuple(int(c) for c in rng.randint(0, 90, size=3)))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            txn.put(f"image-{i:09d}".encode(), buf.getvalue())
            txn.put(f"label-{i:09d}".encode(), words.encode())
        txn.put(b"num-samples", str(n).encode())
    env.close()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toy", help="output folder")
    parser.add_argument("--train_per_class", type=int, default=24)
    parser.add_argument("--val_per_class", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_format", default="png", choices=["png", "jpg"])
    parser.add_argument("--mask_format", default="json", choices=["json", "segmae", "amg"],
                        help="layout of masks/: SAM's JSON, the original segmae table.txt + PNGs, or amg.py folders")
    parser.add_argument("--ade20k_out", default=None,
                        help="also write a toy ADE20k (ADEChallengeData2016 layout) to this folder")
    parser.add_argument("--ade20k_train", type=int, default=40)
    parser.add_argument("--ade20k_val", type=int, default=10)
    parser.add_argument("--lmdb_out", default=None,
                        help="also write a toy text-line LMDB (32 x 128 JPEGs, Union14M-U's layout) to this folder")
    parser.add_argument("--lmdb_images", type=int, default=64)
    args = parse_flags(parser, argv)
    if args.out:
        make_toy_dataset(args.out, args.train_per_class, args.val_per_class, args.size[0], args.size[1], args.seed,
                         image_format=args.image_format, mask_format=args.mask_format)
        n = len(CLASSES) * args.train_per_class
        print(f"wrote {n} training images with SAM-style masks and {len(CLASSES) * args.val_per_class} "
              f"validation images to {args.out}")
    if args.ade20k_out:
        make_toy_ade20k(args.ade20k_out, args.ade20k_train, args.ade20k_val, seed=args.seed)
        print(f"wrote a toy ADE20k ({args.ade20k_train} training, {args.ade20k_val} validation images) "
              f"to {args.ade20k_out}")
    if args.lmdb_out:
        make_toy_text_lmdb(args.lmdb_out, args.lmdb_images, seed=args.seed)
        print(f"wrote a toy text-line LMDB ({args.lmdb_images} images of 32 x 128) to {args.lmdb_out}")


if __name__ == "__main__":
    main()
