"""PNG grids of what a pretrained MAE's encoder sees and what it reconstructs, per image:
original | encoder view (hidden part grey) | visibility (white: visible, black: hidden, titled with
what made the mask: SAM, SAM 2, superpixels) | reconstruction | reconstruction pasted into the
hidden part. Without --checkpoint: the first three columns, what --mask_method would hide, before
any pretraining.

    python tools/visualize.py --checkpoint out/checkpoint-799.pth --data_path data/toy --num 4 --out vis/
    python tools/visualize.py --checkpoint mae_visualize_vit_large.pth --model mae_vit_large_patch16 \\
        --images a.jpg b.jpg --out vis/          # official checkpoints: give --model
    python tools/visualize.py --data_path data/toy --mask_method segments --coverage_ratio 40 --out vis/
    python tools/visualize.py --data_path data/toy --all_methods --num 1 --out vis/   # a row per method

Every mask method's flags are taken (--block_size, --noise_filter, --segment_choice, ...); with
--checkpoint, those given replace the checkpoint's.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_mae  # noqa: E402
from evals.visualize import labelled_grid, mask_panels, panel_titles, reconstruction_panels  # noqa: E402
from inputs.classification import build_eval_transform  # noqa: E402
from inputs.folders import list_images  # noqa: E402
from inputs.images import load_rgb  # noqa: E402
from inputs.transforms import as_hw  # noqa: E402
from mask_methods import COVERAGE_RATIO, MASK_METHODS, add_method_args, get_method, method_class  # noqa: E402
from models_vit import mae_state_dict, pretrain_mask_method  # noqa: E402
from run.checkpoint import (CheckpointError, checkpoint_config, find_last_checkpoint, load_checkpoint,  # noqa: E402
                            saved_args)
from run.files import atomic_write, writable_dir  # noqa: E402
from run.flags import given_flags, parse_flags, positive_int  # noqa: E402
from run.setup import run_tool  # noqa: E402
from sam.geometry import exif_orientation, fit_mask  # noqa: E402
from sam.layouts import SOURCES, ClosestSegment, open_mask_source  # noqa: E402
from sam.listing import stem_of  # noqa: E402
from util.misc import UserError  # noqa: E402


def load_mae(path: str, model: str | None = None, input_size=None, mask_channel: str = "auto"):
    """(the MAE in eval mode, with its mask method and that method's parameters, its input size,
    its input normalisation) of any checkpoint of this repo, the reference's, segmae's or an
    official one."""
    ckpt = load_checkpoint(path)
    config = checkpoint_config(ckpt)
    name = model or config.get("model")
    if name is None:
        raise SystemExit(f"{path} records no model name: pass --model (e.g. mae_vit_large_patch16)")
    size = as_hw(input_size or config.get("input_size") or 224)
    method = method_class(pretrain_mask_method(ckpt)).from_args(saved_args(ckpt))
    weights = mae_state_dict(ckpt, path, mask_channel)
    name = models_mae.model_of_checkpoint(name, weights)
    mae = models_mae.build_mae(name, img_size=size, mask_method=method, norm_pix_loss=bool(config.get("norm_pix_loss")))
    try:
        missing, _ = mae.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {name} ({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}): "
                              f"pass the --model it was trained with") from None
    if missing:
        print(f"note: {len(missing)} weights not in the checkpoint (e.g. {missing[0]}): an encoder-only "
              f"checkpoint reconstructs with a random decoder")
    return mae.eval(), size, config.get("normalization") or "imagenet"


def newest_run_checkpoint(output_dir: str) -> str:
    """The most recently written of the last checkpoints of the runs in output_dir: the benchmark's
    run folders (make demo: output_demo/pretrain_output/<run id>/checkpoint-N.pth) and output_dir
    itself (a main_pretrain.py --output_dir)."""
    runs = os.path.join(output_dir, "pretrain_output")
    folders = [output_dir] + (sorted(os.path.join(runs, d) for d in os.listdir(runs)) if os.path.isdir(runs) else [])
    last = [c for c in (find_last_checkpoint(d) for d in folders if os.path.isdir(d)) if c is not None]
    if not last:
        raise UserError(f"no checkpoint in {output_dir} or {os.path.join(runs, '<run id>')}: run 'make demo' "
                        f"first, or set CHECKPOINT (or SEGMAE_CHECKPOINT) to a checkpoint")
    return max(last, key=os.path.getmtime)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="pretrained MAE; without it: only what --mask_method hides (no reconstruction)")
    add_method_args(p, default_method=None)  # without --checkpoint: the method to show (default: segments)
    p.add_argument("--all_methods", action="store_true",
                   help="without --checkpoint: one grid per image, a row per mask method (segment methods need "
                        "--data_path with masks/)")
    p.add_argument("--patch_size", type=int, default=16, help="without --checkpoint: the patch grid of 'patches'")
    p.add_argument("--model", default=None, help="MAE model name if the checkpoint does not record it")
    p.add_argument("--images", nargs="*", default=[], help="image files (segment methods: masks from --data_path)")
    p.add_argument("--data_path", default=None, help="take --num images from <data_path>/train (with masks/)")
    p.add_argument("--num", type=positive_int, default=4,
                   help="how many images of --data_path/train, spread over its classes, when no --images")
    p.add_argument("--input_size", type=int, nargs="+", default=None,
                   help="default: the checkpoint's (without one: 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="vis")
    p.add_argument("--mask_format", default="auto", choices=("auto",) + tuple(SOURCES),
                   help="layout of <data_path>/masks (default: detected)")
    p.add_argument("--mask_channel", default="auto", choices=["auto", "visible", "hidden"],
                   help="four_channels: what the checkpoint's 4th channel holds (default: read from it)")
    return p


def with_given_flags(method, args, given: set[str]):
    """``method`` with the values of the method flags given on the command line (the others as set)."""
    given_params = {f.name: getattr(args, f.name) for f in method.flags if f.name in given}
    return get_method(method.name, **{**method.params(), **given_params}) if given_params else method


def main(argv=None) -> list[str]:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_flags(parser, argv)
    given = set(given_flags(parser, argv))
    torch.manual_seed(args.seed)
    if args.checkpoint:
        if args.mask_method or args.all_methods:
            raise SystemExit("--mask_method is read from --checkpoint: give one of the two")
        model, size, normalization = load_mae(args.checkpoint, args.model, args.input_size, args.mask_channel)
        methods = [with_given_flags(model.method, args, given)]
    else:
        model, size, normalization = None, as_hw(args.input_size or 224), "imagenet"
        names = MASK_METHODS if args.all_methods else [args.mask_method or "segments"]
        methods = [with_given_flags(get_method(name), args, given) for name in names]
        if any(m.drops_tokens for m in methods) and (size[0] % args.patch_size or size[1] % args.patch_size):
            raise SystemExit(f"--input_size {size} is not a multiple of --patch_size {args.patch_size}")
    # --images: exactly those (--data_path then only supplies their masks); else --num from train/
    images = list(args.images)
    if not images and args.data_path:
        train = os.path.join(args.data_path, "train")
        images = [os.path.join(train, rel) for rel in spread_over_classes(list_images(train), args.num)]
    if not images:
        raise SystemExit("no images: give --images or --data_path")
    writable_dir(args.out, "--out")
    written = []
    source = None
    if any(m.needs_segment for m in methods):
        if not args.data_path:
            if not args.all_methods:
                raise SystemExit(f"{methods[0].name} needs SAM masks: give --data_path (with masks/)")
            methods = [m for m in methods if not m.needs_segment]  # the SAM methods need masks/: left out
        else:
            source = open_segments(args.data_path, images, args.mask_format)
    for path in images:
        rows, labels = [], []
        for method in methods:
            x, seg, generator = image_and_segment(path, size, normalization, source if method.needs_segment else None,
                                                  args.data_path, method)
            mask_ratio = getattr(method, "mask_ratio", args.mask_ratio)
            if model is None:
                rows.append(mask_panels(method, x, seg, mask_ratio, args.patch_size, normalization))
            else:
                rows.append(reconstruction_panels(model, x, seg, mask_ratio, normalization))
            labels.append(method_label(method) if args.all_methods else os.path.basename(path))
        titles = panel_titles(methods[0], generator, getattr(methods[0], "coverage_ratio", None))
        if args.all_methods:
            titles = ["original", "encoder input (hidden: grey)", "white: visible, black: hidden"]
        grid = labelled_grid(torch.cat(rows), titles, labels)
        suffix = "_methods" if args.all_methods else f"_{methods[0].name}" + ("" if model is not None else "_mask")
        out = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + suffix + ".png")
        with atomic_write(out) as f:  # a full disk: one line naming the file, no half-written PNG
            grid.save(f, format="PNG")
        written.append(out)
    print(f"wrote {len(written)} grids to {args.out}")
    return written


def spread_over_classes(rels: list[str], num: int) -> list[str]:
    """num of these paths (relative to train/, sorted), taken in turn from each class folder: the
    first image of every class, then the second, ...; in class order."""
    by_class: dict[str, list[str]] = {}
    for rel in rels:
        by_class.setdefault(rel.split(os.sep, 1)[0] if os.sep in rel else "", []).append(rel)
    rounds = max((len(v) for v in by_class.values()), default=0)
    taken = [files[i] for i in range(rounds) for files in by_class.values() if i < len(files)]
    return taken[:num]


def method_label(method) -> str:
    """A row label: the method and the flags that shape what it hides."""
    shown = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in method.params().items()
             if k != "seg_loss"]
    return f"{method.name} ({', '.join(shown)})" if shown else method.name


def open_segments(data_path: str, images: list[str], mask_format: str = "auto"):
    """The mask source of <data_path>/masks/ for these images of <data_path>/train/."""
    train = os.path.join(data_path, "train")
    return open_mask_source(os.path.join(data_path, "masks"), {stem_of(os.path.relpath(p, train)) for p in images},
                            mask_format)


def image_and_segment(path: str, size, normalization: str = "imagenet", source=None, data_path: str = "",
                      segment_choice=None):
    """(the image as the model takes it (1, 3, H, W), what ``segment_choice`` (the mask method;
    default: the segment closest to 50%) hides of it on the same grid (1, 1, H, W) with 1 =
    hidden, or None without a mask source, and what made the segment)."""
    img = load_rgb(path)
    x = build_eval_transform(size, crop_pct=1.0, normalization=normalization)(img).unsqueeze(0)
    if source is None:
        return x, None, None
    rel = os.path.relpath(path, os.path.join(data_path, "train"))
    choice = segment_choice if segment_choice is not None else ClosestSegment(COVERAGE_RATIO.default)
    segments = source.segments(rel)
    hidden = choice.hidden_segment(segments, img.size, torch.Generator().manual_seed(0))
    m, _ = fit_mask(hidden, img.size, exif_orientation(path), source.location(rel), segments.frame)
    seg = torch.from_numpy(np.asarray(to_mask(Image.fromarray(m), size), dtype=np.float32))[None, None]
    return x, seg, source.generator(rel)


def to_mask(mask: Image.Image, size) -> np.ndarray:
    """The mask through exactly the image's geometry (build_eval_transform with crop_pct 1: the
    same Resize and CenterCrop, with nearest interpolation), so it lines up pixel for pixel."""
    import torchvision.transforms as T
    h, w = as_hw(size)
    resize = h if h == w else (h, w)
    geometry = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop((h, w))])
    return np.asarray(geometry(mask))


if __name__ == "__main__":
    run_tool(main)
