"""A frozen-encoder dense probe on ADE20k (the linear probe of DINOv2 and Pixio): the encoder of any
pretraining checkpoint (any mask method, or an official MAE one) is frozen, a linear head on its
patch features (BatchNorm first with --batchnorm, as DINOv2's) is trained for a short schedule, and
the model is scored with the Segmenter's own mIoU and sliding-window evaluation. Minutes where a
Segmenter takes hours; it says how good the frozen features are, which the Segmenter's
finetuning of the whole encoder does not.

    python -m evals.probe --checkpoint out/checkpoint-799.pth --dataset-dir data/ADEChallengeData2016
    python -m evals.probe --checkpoint random --backbone vit_base_patch16 ...   # before pretraining
    torchrun --nproc_per_node 8 -m evals.probe ...                              # the same on 8 GPUs
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn

import models_mae
import run.setup as runsetup
from inputs.pretrain import loader_options
from inputs.transforms import NORMALIZATIONS
from models_vit import load_encoder, load_pretrained_encoder, timm_name
from run.checkpoint import checkpoint_config, load_checkpoint
from run.distributed import check_ranks_agree, file_list_digest
from run.files import atomic_write_json, writable_dir
from run.flags import non_negative_float, non_negative_int, positive_int, show_defaults
from segmenter.data import ADE20K, ADE20K_CLASSES, IGNORE_INDEX, SegEvalTransform, SegTrainTransform, training_scale
from segmenter.engine import evaluate, train_one_epoch
from segmenter.model import BACKBONES, build_segmenter
from util.misc import LossScaler, UserError, get_rank, get_world_size, is_main_process

RANDOM = "random"  # --checkpoint random: the encoder as MAE pretraining starts it, the probe's floor


class ProbeHead(nn.Module):
    """BatchNorm (optional) and a linear classifier on every patch feature: (N, L, D) -> (N, n_cls, rows, cols)."""

    def __init__(self, n_cls: int, d_encoder: int, batchnorm: bool = False):
        super().__init__()
        self.n_cls = n_cls
        self.norm = nn.BatchNorm1d(d_encoder) if batchnorm else nn.Identity()
        self.head = nn.Linear(d_encoder, n_cls)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        x = self.head(x)
        return x.transpose(1, 2).reshape(x.shape[0], self.n_cls, *grid)


def initial_encoder(backbone: str, size: int) -> dict:
    """The encoder as MAE pretraining starts it (models_mae's initialisation of the backbone's MAE),
    as a checkpoint: what the probe of a pretrained encoder is to be compared with."""
    mae_name = "mae_" + backbone
    if mae_name not in models_mae.MODEL_NAMES:
        raise UserError(f"--checkpoint {RANDOM}: no MAE is registered for --backbone {backbone} ({mae_name})")
    torch.manual_seed(0)
    return {"model": models_mae.build_mae(mae_name, img_size=size).state_dict()}


def frozen_segmenter(args) -> tuple[nn.Module, str]:
    """The Segmenter-shaped model (its sliding-window inference applies) with the checkpoint's
    encoder frozen and a probe head; and the pretraining method ('random' for none)."""
    if args.checkpoint == RANDOM and args.backbone is None:
        raise UserError("--checkpoint random needs --backbone (e.g. vit_base_patch16): the random encoder's size")
    checkpoint = initial_encoder(args.backbone, args.crop_size) if args.checkpoint == RANDOM \
        else load_checkpoint(args.checkpoint)
    backbone = args.backbone or timm_name(load_encoder(args.checkpoint, checkpoint)[4])
    model = build_segmenter(backbone, "linear", args.n_cls, args.crop_size, channels=3, drop_path_rate=0.0)
    method, _, _ = load_pretrained_encoder(model.encoder, args.checkpoint, checkpoint=checkpoint,
                                           flag="--backbone")
    method = RANDOM if args.checkpoint == RANDOM else method
    model.encoder.requires_grad_(False)  # frozen: no gradient, its weights stay as loaded
    model.decoder = ProbeHead(args.n_cls, model.encoder.embed_dim, args.batchnorm)
    if args.normalization is None:
        args.normalization = checkpoint_config(checkpoint).get("normalization") or "imagenet"
    return model, method


class FrozenEncoderTraining(nn.Module):
    """Keeps the frozen encoder in eval mode while the head trains (its LayerNorms have no running
    statistics, but a drop path or dropout would otherwise act)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.encoder.eval()
        return self

    def forward(self, x):
        return self.model(x)


def probe(args: argparse.Namespace) -> dict:
    run = runsetup.setup_run(args, __file__)
    start = time.time()
    model, method = frozen_segmenter(args)
    train_set = ADE20K(args.dataset_dir, "train",
                       SegTrainTransform(args.crop_size, base_scale=training_scale(args.crop_size),
                                         normalization=args.normalization),
                       seed=args.seed, num_classes=args.n_cls)
    val_set = ADE20K(args.dataset_dir, "val", SegEvalTransform(args.crop_size, normalization=args.normalization),
                     num_classes=args.n_cls)
    check_ranks_agree(args, {f"{split} images": (len(ds), file_list_digest(ds.names, ""))
                             for split, ds in (("train", train_set), ("val", val_set))})
    world = get_world_size()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and does not split over {world} "
                        f"processes: use a multiple of {world}")
    if len(train_set) < args.batch_size:
        raise UserError(f"only {len(train_set)} training images for a global batch of {args.batch_size}: "
                        f"lower --batch-size")
    model.to(run.device)
    trained = runsetup.wrap_model(FrozenEncoderTraining(model), run)
    head = [p for p in model.decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head, lr=args.lr, weight_decay=args.weight_decay)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=get_rank(), shuffle=True,
                                                  seed=args.seed)
    loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size // world,
                                         drop_last=True, pin_memory=run.device.type == "cuda",
                                         **loader_options(args.num_workers))
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    loss_scaler = LossScaler(enabled=run.amp == "fp16")
    total = args.epochs * len(loader)
    step = 0
    for epoch in range(args.epochs):
        runsetup.seed_epoch(args.seed, epoch, get_rank())
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        _, step = train_one_epoch(trained, loader, optimizer, criterion, loss_scaler, run, epoch, step, total, args)
    train_seconds = time.time() - start
    metrics = evaluate(model, val_set, run, args)
    result = {"probe_miou": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"],
              "mean_class_accuracy": metrics["mean_class_accuracy"], "method": method,
              "checkpoint": args.checkpoint, "epochs": args.epochs, "batchnorm": args.batchnorm,
              "train_images": len(train_set), "train_seconds": round(train_seconds, 1),
              "seconds": round(time.time() - start, 1)}
    print(f"* probe mIoU {metrics['mIoU']:.2f} ({method}, {args.epochs} epochs, {result['seconds']}s)")
    if args.out and is_main_process():
        atomic_write_json(args.out, result, indent=1)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Frozen-encoder linear probe on ADE20k", add_help=True)
    p.add_argument("--checkpoint", required=True, help=f"pretraining checkpoint, or '{RANDOM}' (with --backbone)")
    p.add_argument("--dataset-dir", required=True, help="ADEChallengeData2016 folder (images/, annotations/)")
    p.add_argument("--backbone", default=None, choices=BACKBONES, help="default: the checkpoint's encoder")
    p.add_argument("--n-cls", type=positive_int, default=ADE20K_CLASSES)
    p.add_argument("--crop-size", type=positive_int, default=512, help="training crop, evaluation window and short side")
    p.add_argument("--epochs", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=16, help="global batch, split over the processes")
    p.add_argument("--lr", type=non_negative_float, default=1e-3, help="AdamW, polynomial decay per step")
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    p.add_argument("--batchnorm", action="store_true", help="BatchNorm before the linear head (DINOv2's probe)")
    p.add_argument("--normalization", default=None, choices=sorted(NORMALIZATIONS),
                   help="input mean/std (default: the one the checkpoint was pretrained with)")
    p.add_argument("--out", default="", help="write the scores here as JSON")
    p.add_argument("--num-workers", type=non_negative_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision (default: bf16 on GPUs that support it)")
    p.add_argument("--print-freq", type=positive_int, default=50)
    return show_defaults(p)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.out:
        writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out folder")
    # what the shared set-up and the Segmenter's loops read
    args.window_size = args.window_stride = args.crop_size
    args.dist_on_itp, args.dist_url, args.output_dir, args.log_dir = False, "env://", "", ""
    args.dist_timeout, args.stop_epoch, args.accum_iter = 600, None, 1


def cli(argv: list[str] | None = None) -> dict:
    return runsetup.run_cli(get_args_parser(), check_args, probe, argv)


if __name__ == "__main__":
    cli()
