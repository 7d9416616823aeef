"""Train a Segmenter on ADE20k from a pretrained encoder and score it by single-scale mIoU.

    python -m segmenter.train --dataset-dir data/ADEChallengeData2016 --log-dir seg_out \\
        --backbone vit_base_patch16 --decoder mask_transformer --mae-chp pretrain/checkpoint-799.pth
    torchrun --nproc_per_node 8 -m segmenter.train ...       (same command, same global batch, on N GPUs)

Defaults are Segmenter's for ADE20k (rstrudel/segmenter): 64 epochs, global batch 8, SGD with
Nesterov momentum 0.9 and lr 0.001 (polynomial decay, power 0.9, to 1e-5), no weight decay, crop
512, sliding windows 512 / stride 512 whose logits are averaged. README.md lists where this repo
differs and how to get the original's behaviour.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: python segmenter/train.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import run.setup as runsetup
import util.misc as misc
from inputs.pretrain import freeze_heap, loader_options
from inputs.transforms import NORMALIZATIONS
from mask_methods import MASK_METHODS
from models_vit import load_pretrained_encoder, model_patch_size
from run.checkpoint import (Resumed, append_log, check_writable_names, checkpoint_args, checkpoint_config,
                            load_checkpoint, open_resume, optimizer_state_dict, resume_states, resumed_identity,
                            save_checkpoint, saved_args)
from run.distributed import DEFAULT_DIST_TIMEOUT_S, check_ranks_agree, file_list_digest
from run.files import atomic_write_json, read_jsonl, writable_dir
from run.flags import (add_mask_channel_arg, add_tracking_args, device_type, fraction_below_one, non_negative_float,
                       non_negative_int, positive_int, too_many_tokens)
from run.setup import Runtime
from run.tracking import tracking_writer
from segmenter.checkpoints import (is_original_layout, original_settings, own_state_dict, set_layernorm_eps,
                                   with_original_head, write_variant)
from segmenter.data import ADE20K, ADE20K_CLASSES, IGNORE_INDEX, SegEvalTransform, SegTrainTransform
from segmenter.engine import evaluate, train_one_epoch
from segmenter.model import BACKBONES, DECODERS, build_segmenter
from util.lr_decay import param_groups_weight_decay
from util.misc import UserError, get_rank, get_world_size, is_main_process

CHECKPOINT = "checkpoint.pth"
# what defines the model; a resumed or evaluated checkpoint supplies them unless given
# what defines a Segmenter: a resumed checkpoint supplies them unless given
MODEL_FLAGS = {k: None for k in ("backbone", "decoder", "n_cls", "crop_size", "channels", "normalization",
                                 "encoder_norm_eps")}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Segmenter training on ADE20k", add_help=True)
    p.add_argument("--dataset-dir", required=True, help="ADEChallengeData2016 folder (images/, annotations/)")
    p.add_argument("--log-dir", required=True, help="checkpoints, log.txt, metrics and TensorBoard logs")
    p.add_argument("--backbone", default="vit_base_patch16", choices=BACKBONES)
    p.add_argument("--decoder", default="mask_transformer", choices=DECODERS)
    p.add_argument("--mae-chp", default="", help="pretraining checkpoint (any mask method, or official MAE)")
    p.add_argument("--mask-method", default=None, choices=MASK_METHODS,
                   help="pretraining method of --mae-chp: read from it; an error if it disagrees")
    p.add_argument("--channels", type=int, default=3, choices=[3, 4],
                   help="encoder input channels: 4 keeps a four_channels encoder's visibility channel "
                        "(fed constant 1), 3 folds it into the RGB kernel")
    add_mask_channel_arg(p, dashes=True)
    p.add_argument("--n-cls", type=positive_int, default=ADE20K_CLASSES)
    p.add_argument("--normalization", default=None, choices=sorted(NORMALIZATIONS),
                   help="input mean/std: imagenet (MAE's encoders) or vit (0.5/0.5: Segmenter's own ViT backbones, "
                        "Union14M's text-line MAE); default: the one --mae-chp was pretrained with, else imagenet")
    p.add_argument("--encoder-norm-eps", type=float, default=1e-6,
                   help="the encoder's LayerNorm eps: 1e-6 as MAE (Segmenter's own ViTs: 1e-5, taken from them)")
    p.add_argument("--crop-size", type=positive_int, default=512)
    p.add_argument("--window-size", type=positive_int, default=None, help="default: the crop size")
    p.add_argument("--window-stride", type=positive_int, default=None,
                   help="default: the window size, as Segmenter's evaluation during training (its published "
                        "scores, segm/eval/miou.py: the crop size - 32, i.e. 480)")
    p.add_argument("--eval-short-side", type=positive_int, default=None,
                   help="validation images are resized to this short side (default: the crop size)")
    p.add_argument("--epochs", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="global batch, split evenly over the processes (as Segmenter's)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum"],
                   help="sgd: SGD with Nesterov momentum 0.9 (Segmenter's: timm's 'sgd'); momentum: plain momentum 0.9")
    p.add_argument("--lr", type=non_negative_float, default=0.001)
    p.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--drop-path", type=fraction_below_one, default=0.1, help="drop-path rate, in [0, 1)")
    p.add_argument("--eval-freq", type=positive_int, default=4, help="evaluate every N epochs and after the last")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --log-dir (or --mae-chp "
                                                            "with a fresh decoder) and exit")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision (bare --amp: bf16; default: bf16 on GPUs that support it)")
    p.add_argument("--no-amp", action="store_const", const="none", dest="amp")
    p.add_argument("--resume", action="store_true", default=True,
                   help="continue from <log-dir>/checkpoint.pth if it exists (default)")
    p.add_argument("--no-resume", action="store_false", dest="resume")
    p.add_argument("--num-workers", type=non_negative_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    add_tracking_args(p, dashes=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_type)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--print-freq", type=positive_int, default=50)
    p.add_argument("--dist-url", dest="dist_url", default="env://")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=positive_int, default=DEFAULT_DIST_TIMEOUT_S,
                   metavar="SECONDS", help="a collective that waits longer (a stuck rank) stops every rank")
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None, derive_only: bool = False) -> None:
    """Window and evaluation sizes default to the crop size (derived again when the crop size is
    taken from a checkpoint)."""
    given = set(getattr(args, "given_flags", []))
    if derive_only or not args.window_size:
        args.window_size = args.window_size if "window_size" in given else args.crop_size
    if derive_only or not args.window_stride:
        args.window_stride = args.window_stride if "window_stride" in given else args.window_size
    if derive_only or not args.eval_short_side:
        args.eval_short_side = args.eval_short_side if "eval_short_side" in given else args.crop_size
    check_sizes(args, parser)
    if derive_only:
        return
    if args.window_stride > args.window_size:
        parser.error(f"--window-stride {args.window_stride} > --window-size {args.window_size} leaves pixels unseen")
    # names the shared distributed and run set-up expects
    args.dist_on_itp, args.output_dir = False, args.log_dir


def check_sizes(args: argparse.Namespace, parser: argparse.ArgumentParser | None) -> None:
    """The crop and the sliding window hold at least one patch of --backbone, and not more than a
    ViT here takes (a size taken from a checkpoint is checked too: then the error is a UserError)."""
    def refuse(message: str):
        if parser is not None:
            parser.error(message)
        raise UserError(message)

    patch = model_patch_size(args.backbone) if args.backbone in BACKBONES else None
    if patch is None:
        return
    for flag, size in (("--crop-size", args.crop_size), ("--window-size", args.window_size)):
        if size < patch:
            refuse(f"{flag} {size} is smaller than the patch size {patch} of --backbone {args.backbone}: an image "
                   f"would hold no patch; pass at least {patch} (Segmenter's ADE20k crop: 512)")
        problem = too_many_tokens(size, size, patch)
        if problem:
            refuse(f"{flag} {size}: {problem}")


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """Segmenter's SGD (timm's create_optimizer 'sgd'): Nesterov momentum 0.9; with weight decay,
    biases, norms and the position / class embeddings get none."""
    if args.weight_decay > 0:
        params = param_groups_weight_decay(model, args.weight_decay,
                                           {"encoder.pos_embed", "encoder.cls_token", "decoder.cls_emb"})
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=args.optimizer == "sgd",
                           weight_decay=args.weight_decay)


def per_rank_batch(args) -> int:
    world = get_world_size()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and does not split over {world} "
                        f"processes: use a multiple of {world}")
    print(f"batch {args.batch_size} global = {args.batch_size // world} per process x {world} processes")
    return args.batch_size // world


def write_metrics(args, epoch: int, metrics: dict) -> None:
    if is_main_process():
        for name in (f"metrics_epoch{epoch}.json", "metrics.json"):
            atomic_write_json(os.path.join(args.log_dir, name), {"epoch": epoch, **metrics}, indent=1)


def build_datasets(args, resumed: Resumed | None = None) -> tuple[ADE20K, ADE20K]:
    train_set = ADE20K(args.dataset_dir, "train", SegTrainTransform(args.crop_size, normalization=args.normalization),
                       seed=args.seed, num_classes=args.n_cls)
    val_set = ADE20K(args.dataset_dir, "val", SegEvalTransform(args.eval_short_side, normalization=args.normalization),
                     num_classes=args.n_cls)
    print(f"{len(train_set)} training and {len(val_set)} validation images")
    check_ranks_agree(args, {**{f"{split} images": (len(ds), file_list_digest(ds.names, ""))
                                for split, ds in (("train", train_set), ("val", val_set))},
                             **resumed_identity(resumed)})
    return train_set, val_set


def build_model(args, run: Runtime, resumed: Resumed | None, pretrained: dict | None):
    """(model to train, the plain model, optimizer, loss scaler, first epoch): from --mae-chp
    (``pretrained``, read), or resumed from the run's checkpoint (ours, or rstrudel/segmenter's
    layout: weights only)."""
    model = build_segmenter(args.backbone, args.decoder, args.n_cls, args.crop_size, args.channels,
                            drop_path_rate=args.drop_path)
    set_layernorm_eps(model.encoder, args.encoder_norm_eps)
    if pretrained is not None:
        method, _, _ = load_pretrained_encoder(model.encoder, args.mae_chp, args.mask_method,
                                               fold_mask_channel=args.channels == 3, checkpoint=pretrained,
                                               mask_channel=args.mask_channel, flag="--backbone")
        args.mask_method = method
    elif resumed is None:
        print("WARNING: no --mae-chp: the encoder starts from random weights")
    model.to(run.device)
    model_without_ddp = model
    model = runsetup.wrap_model(model, run)
    optimizer = build_optimizer(model_without_ddp, args)
    loss_scaler = misc.LossScaler(enabled=run.amp == "fp16")
    if resumed is None:
        return model, model_without_ddp, optimizer, loss_scaler, 0
    ckpt = resumed.checkpoint
    original = is_original_layout(ckpt)
    if original:
        print(f"{resumed.path} is in rstrudel/segmenter's layout: its weights are loaded, its optimizer and "
              f"lr_scheduler state are not" + ("" if args.eval_only else " (training goes on with a fresh SGD)"))
    state = ckpt.get("optimizer")
    weights_only = original or not (isinstance(state, dict) and state)
    if weights_only and not original and not args.eval_only:
        print(f"WARNING: {resumed.path} holds no optimizer state: its weights are loaded, SGD starts afresh (no "
              f"momentum) at epoch {resumed.epoch + 1}", file=sys.stderr)
    resume_states(resumed, model_without_ddp, None if weights_only else optimizer, loss_scaler, own_state_dict(ckpt))
    start_epoch = resumed.epoch + 1
    args.mask_method = resumed.args.get("mask_method", args.mask_method)
    print(f"Resumed from {resumed.path} at epoch {start_epoch}")
    return model, model_without_ddp, optimizer, loss_scaler, start_epoch


def evaluate_and_record(model_without_ddp, val_set: ADE20K, run: Runtime, args, epoch: int, log_writer) -> dict:
    """Scores the model after `epoch` and adds the scores to that epoch's log row."""
    scores = evaluate(model_without_ddp, val_set, run, args)
    write_metrics(args, epoch, scores)
    if is_main_process():
        row = next((r for r in read_jsonl(os.path.join(args.log_dir, "log.txt")) if r.get("epoch") == epoch),
                   {"epoch": epoch})
        append_log(args.log_dir, {**row, **{k: scores[k] for k in ("mIoU", "pixel_accuracy", "mean_class_accuracy")}})
    if log_writer is not None:
        for k in ("mIoU", "pixel_accuracy", "mean_class_accuracy"):
            log_writer.add_scalar(f"val/{k}", scores[k], epoch)
    return scores


def evaluation_due(args, epoch: int) -> bool:
    return (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs


def save_epoch(args, run: Runtime, epoch: int, stats: dict, model_without_ddp, optimizer, loss_scaler,
               ckpt_path: str, log_writer) -> None:
    """The row, then the checkpoint (a failed save repeats the epoch and its row); the evaluation
    comes after, so a bad validation file loses no training."""
    if not is_main_process():
        return
    append_log(args.log_dir, {"epoch": epoch, "train_loss": stats["loss"], "lr": stats["lr"]})
    save_checkpoint({"model": with_original_head(model_without_ddp.state_dict(), model_without_ddp.encoder.embed_dim),
                     "optimizer": optimizer_state_dict(optimizer, model_without_ddp),
                     "epoch": epoch, "scaler": loss_scaler.state_dict(), "args": checkpoint_args(args, run)}, ckpt_path)
    if log_writer is not None:
        log_writer.flush()


def take_pretrained_normalization(args: argparse.Namespace, pretrained: dict | None) -> None:
    """No --normalization: the input statistics the encoder was pretrained with (ImageNet's without
    --mae-chp or where it does not say)."""
    normalization = checkpoint_config(pretrained).get("normalization") if pretrained is not None else None
    args.normalization = normalization or "imagenet"
    if normalization:
        print(f"--normalization {normalization} taken from {args.mae_chp}")


def checkpoint_settings(checkpoint: dict, path: str) -> dict:
    """The Segmenter's flags a checkpoint was trained with (rstrudel/segmenter's layout: read off
    its variant.yml or tensors)."""
    return vars(original_settings(checkpoint, path)) if is_original_layout(checkpoint) else saved_args(checkpoint)


def main(args: argparse.Namespace) -> dict:
    writable_dir(args.log_dir, "--log-dir")
    run = runsetup.setup_run(args, __file__)
    ckpt_path = os.path.join(args.log_dir, CHECKPOINT)
    resumed = None
    if args.resume and os.path.exists(ckpt_path):  # the model's settings are the checkpoint's unless given
        resumed = open_resume(args, MODEL_FLAGS, path=ckpt_path, dashes=True, settings=checkpoint_settings)
        check_args(args, None, derive_only=True)
    elif args.eval_only and not args.mae_chp:
        raise UserError(f"--eval-only found no {ckpt_path} and no --mae-chp: nothing to evaluate")
    pretrained = load_checkpoint(args.mae_chp) if args.mae_chp and resumed is None else None
    if args.normalization is None:
        take_pretrained_normalization(args, pretrained)
    batch_per_rank = per_rank_batch(args)
    train_set, val_set = build_datasets(args, resumed)
    model, model_without_ddp, optimizer, loss_scaler, start_epoch = build_model(args, run, resumed, pretrained)
    original = resumed is not None and is_original_layout(resumed.checkpoint)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    if args.eval_only:
        freeze_heap(args.num_workers)  # the evaluation's loader workers fork from this heap
        metrics = evaluate(model_without_ddp, val_set, run, args)
        write_metrics(args, start_epoch - 1, metrics)
        return metrics

    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=get_world_size(),
                                                  rank=get_rank(), shuffle=True, seed=args.seed)
    if len(train_set) < args.batch_size:
        raise UserError(f"only {len(train_set)} training images for a global batch of {args.batch_size}: "
                        f"lower --batch-size")
    check_writable_names(args.log_dir, [CHECKPOINT])  # never write over a file that could not be read
    if is_main_process() and not original:
        write_variant(args, model_without_ddp, batch_per_rank, run.amp)
    loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=batch_per_rank, drop_last=True,
                                         pin_memory=run.device.type == "cuda", **loader_options(args.num_workers))
    total_steps = args.epochs * len(loader)
    log_writer = tracking_writer(args, "segmenter")
    metrics: dict = {}
    last_done = start_epoch - 1
    if (resumed is not None and last_done >= 0 and evaluation_due(args, last_done)
            and not os.path.exists(os.path.join(args.log_dir, f"metrics_epoch{last_done}.json"))):
        print(f"The evaluation after epoch {last_done} did not finish: running it now")
        metrics = evaluate_and_record(model_without_ddp, val_set, run, args, last_done, log_writer)
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        runsetup.seed_epoch(args.seed, epoch, get_rank())
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        stats, _ = train_one_epoch(model, loader, optimizer, criterion, loss_scaler, run, epoch,
                                   epoch * len(loader), total_steps, args, log_writer)
        save_epoch(args, run, epoch, stats, model_without_ddp, optimizer, loss_scaler, ckpt_path, log_writer)
        if evaluation_due(args, epoch):
            metrics = evaluate_and_record(model_without_ddp, val_set, run, args, epoch, log_writer)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start))}")
    if log_writer is not None:
        log_writer.close()
    if not metrics:  # nothing was left to train: score the checkpoint
        metrics = evaluate(model_without_ddp, val_set, run, args)
    return metrics


def cli(argv: list[str] | None = None) -> dict:
    return runsetup.run_cli(get_args_parser(), check_args, main, argv)


if __name__ == "__main__":
    cli()
