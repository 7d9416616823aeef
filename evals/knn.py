"""A cheap representation signal: weighted k-nearest-neighbour top-1 on frozen encoder features
(the DINO protocol: cosine similarity of L2-normalised features, the k = 20 nearest training
features vote with weight exp(similarity / 0.07)). The memory bank is a fixed, seeded,
class-balanced subset of the training split; the queries are the whole validation split.

    python -m evals.knn --checkpoint out/checkpoint-99.pth --data_path /datasets/imagenet --bank_per_class 100
    torchrun --nproc_per_node 8 -m evals.knn ...          # features extracted over the ranks

Any checkpoint of any method (and official MAE ones): the encoder is built as for finetuning, with a
four_channels patch embedding folded (= the image fully visible, 4th channel 1).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

import models_vit
import run.setup as runsetup
from inputs.classification import CheckedImageFolder, build_eval_transform, build_resize_transform
from inputs.pretrain import freeze_heap
from inputs.transforms import as_hw
from models_vit import load_encoder, load_pretrained_encoder, timm_name
from run.checkpoint import checkpoint_config, load_checkpoint
from run.files import atomic_write_json, writable_dir
from run.flags import add_mask_channel_arg, show_defaults
from run.setup import Runtime, resolve_amp
from util.misc import UserError, autocast, get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process


def balanced_subset(targets: list[int], per_class: int, seed: int = 0) -> list[int]:
    """per_class indices of each class (all of a smaller class), drawn with a fixed seed; sorted."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    chosen = []
    for _, idx in sorted(by_class.items()):
        order = torch.randperm(len(idx), generator=g).tolist()
        chosen += [idx[j] for j in order[:per_class]]
    return sorted(chosen)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy (percent); features are L2-normalised here."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp().double())
        correct += int((votes.argmax(1) == query_labels[start:start + chunk]).sum())
    return 100.0 * correct / max(queries.shape[0], 1)


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset, indices: list[int], device: torch.device, amp: str,
                     batch_size: int, num_workers: int, pool: str) -> torch.Tensor:
    """Features of dataset[indices], each rank computing a contiguous share; returned in order on
    every rank (so the result does not depend on the number of ranks)."""
    world, rank = get_world_size(), get_rank()
    bounds = [len(indices) * r // world for r in range(world + 1)]
    mine = indices[bounds[rank]:bounds[rank + 1]]
    freeze_heap(num_workers)  # the workers' collections then leave this process's heap shared
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    feats = []
    model.eval()
    for images, _ in loader:
        with autocast(device, amp):
            tokens = model.forward_features(images.to(device, non_blocking=True))
        feats.append((tokens[:, 0] if pool == "cls" else tokens[:, model.num_prefix_tokens:].mean(1)).float().cpu())
    dim = model.embed_dim
    local = torch.cat(feats) if feats else torch.zeros(0, dim)
    if not is_dist_avail_and_initialized():
        return local
    most = max(bounds[r + 1] - bounds[r] for r in range(world))
    padded = torch.zeros(most, dim, device=device)
    padded[:local.shape[0]] = local.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[:bounds[r + 1] - bounds[r]].cpu() for r, g in enumerate(gathered)])


def knn_datasets(data_path: str, transform=None) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """(train, val) of data_path as kNN reads them: ImageFolders, val numbered by train's classes
    (a flat val/, a class train/ lacks, an empty class: one error naming it). The benchmark calls
    it before its first stage."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_path, split)):
            raise UserError(f"--data_path {data_path} has no {split}/ folder (ImageFolder layout), which kNN reads")
    train = CheckedImageFolder(os.path.join(data_path, "train"), transform)
    val = CheckedImageFolder(os.path.join(data_path, "val"), transform, class_to_idx=train.class_to_idx)
    return train, val


def check_input_size(size, patch: int, model: str) -> tuple[int, int]:
    """--input_size as (H, W), each side a multiple of the encoder's patch (and at least one patch)."""
    h, w = as_hw(size)
    if h < patch or w < patch or h % patch or w % patch:
        raise UserError(f"--input_size {h} {w} does not fit {model}: each side must be a multiple of its patch size "
                        f"{patch} (leave --input_size out to use the size it was pretrained at)")
    return h, w


def knn_eval(args: argparse.Namespace, run: Runtime | None = None) -> dict:
    """Builds the encoder of args.checkpoint and scores it; returns {'knn_top1', ...}. run: the
    command's Runtime (without one: one process on --device)."""
    device = run.device if run is not None else torch.device(args.device)
    amp = run.amp if run is not None else resolve_amp(args.amp, device)
    start = time.time()
    ckpt = load_checkpoint(args.checkpoint)
    _, _, method, size, shape = load_encoder(args.checkpoint, ckpt, args.mask_channel)
    if args.input_size:
        size = check_input_size(args.input_size, shape["patch"], f"the encoder of {args.checkpoint}")
    model = models_vit.build_vit(timm_name(shape), img_size=size, num_classes=0)
    load_pretrained_encoder(model, args.checkpoint, fold_mask_channel=True, checkpoint=ckpt,
                            mask_channel=args.mask_channel)
    model.to(device)
    config = checkpoint_config(ckpt)  # the pretraining recipe: how its inputs were resized and normalised
    normalization = config.get("normalization") or "imagenet"
    transform = (build_resize_transform(size, normalization) if config.get("augment") == "resize"
                 else build_eval_transform(size, normalization=normalization))
    train, val = knn_datasets(args.data_path, transform)
    bank_idx = balanced_subset(train.targets, args.bank_per_class, args.seed)
    bank = extract_features(model, train, bank_idx, device, amp, args.batch_size, args.num_workers, args.pool)
    queries = extract_features(model, val, list(range(len(val))), device, amp, args.batch_size,
                               args.num_workers, args.pool)
    top1 = knn_top1(bank, torch.from_numpy(train.samples.labels[bank_idx]), queries, torch.tensor(val.targets),
                    len(train.classes), args.k, args.temperature)
    result = {"knn_top1": top1, "k": args.k, "temperature": args.temperature, "pool": args.pool,
              "bank_size": len(bank_idx), "queries": len(val), "method": method,
              "seconds": round(time.time() - start, 1)}
    print(f"* kNN top-1 {top1:.2f}% (k {args.k}, bank {len(bank_idx)}, {len(val)} queries, {method}, "
          f"{result['seconds']}s)")
    if args.out and is_main_process():
        writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out folder")
        atomic_write_json(args.out, result, indent=1)
    return result


def temperature_type(value: str) -> float:
    """A finite temperature > 0: 0 divides by zero, a negative one makes the least similar features
    win, nan and inf make every vote equal (each a chance-level top-1)."""
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (the DINO protocol's is 0.07), got {value}")
    return v


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Weighted kNN top-1 of a pretrained encoder", add_help=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_path", required=True, help="train/ (the memory bank is drawn from it) and val/")
    p.add_argument("--bank_per_class", type=int, default=100, help="training images per class in the memory bank")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=temperature_type, default=0.07,
                   help="the votes' weight is exp(similarity / temperature)")
    p.add_argument("--pool", default="cls", choices=["cls", "mean"], help="CLS token or mean of the patch tokens")
    p.add_argument("--input_size", type=int, nargs="+", default=None, help="default: the pretraining size")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes (default: the CPUs this machine has, at most 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="write the result as JSON here")
    p.add_argument("--dist_url", default="env://")
    add_mask_channel_arg(p)
    return show_defaults(p)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.bank_per_class < 1 or args.k < 1:
        parser.error("--bank_per_class and --k must be positive")
    if args.input_size is not None and not (len(args.input_size) in (1, 2) and min(args.input_size) > 0):
        parser.error(f"--input_size takes one or two positive integers (H W), got {' '.join(map(str, args.input_size))}")
    args.dist_on_itp, args.output_dir = False, ""


def main(args: argparse.Namespace) -> dict:
    run = runsetup.setup_run(args, __file__)  # ranks, device and mixed-precision choice, as every command
    return knn_eval(args, run)


def cli(argv: list[str] | None = None) -> dict:
    return runsetup.run_cli(get_args_parser(), check_args, main, argv)


if __name__ == "__main__":
    cli()
