"""MAE pretraining with random patches or SAM segments as masks.

    python main_pretrain.py --data_path DIR --mask_method four_channels --model mae_vit_base_patch16
    torchrun --nproc_per_node 8 main_pretrain.py ...   (same command on N GPUs)
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

import models_mae
import run.setup as runsetup
import util.misc as misc
from engine_pretrain import train_one_epoch
from evals.visualize import labelled_grid, panel_titles, reconstruction_panels
from inputs.gpu_decode import DevicePrefetcher
from inputs.pretrain import (DEFAULT_MASK_SIZE_CHECK, build_pretrain_dataset, build_pretrain_transform,
                             collate_pretrain, loader_options)
from inputs.shards import DEFAULT_SHUFFLE_BUFFER, build_shard_dataset, is_shard_path
from inputs.transforms import DATA_BACKENDS, REFERENCE_RECIPE, TEXT_LINE_RECIPE, add_recipe_args, as_hw
from mask_methods import add_method_args, get_method, uses_segments
from models_vit import refuse_original_to_continue, stack_official_into_mae
from run.checkpoint import (append_log, auto_resume, load_checkpoint, load_model, reconcile_with_checkpoint, run_start,
                            save_model)
from run.distributed import check_ranks_agree, local_main_first
from run.flags import (add_mask_channel_arg, add_training_args, check_model_and_input_size, check_optimizer_args,
                       mask_ratio_type, non_negative_int, positive_int)
from run.setup import Runtime, build_optimizer, convert_to_fp8
from sam.listing import MASK_FORMATS
from util.lr_decay import param_groups_weight_decay
from util.misc import UserError, all_reduce_mean, autocast, get_rank, get_world_size

# What defines a pretraining run besides its mask method's own flags (MaskMethod.run_flags): a
# resume keeps the checkpoint's values; and the files it starts from (auto-resume continues only
# a run that started from the same data and the same --stack file).
RUN_FLAGS = ["model", "mask_method", "norm_pix_loss", "input_size", "augment", "normalization"]
RUN_START_FILES = ["stack"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE pre-training', add_help=False)
    add_training_args(parser)
    add_recipe_args(parser)
    parser.add_argument('--model', default='mae_vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train')
    parser.add_argument('--mask_ratio', default=0.75, type=mask_ratio_type,
                        help='Masking ratio (percentage of removed patches), patches method only')
    parser.add_argument('--norm_pix_loss', action='store_true',
                        help='Use (per-patch) normalized pixels as targets for computing loss')
    parser.set_defaults(norm_pix_loss=False)
    add_method_args(parser)
    parser.add_argument('--mask_format', default='auto', choices=("auto",) + MASK_FORMATS,
                        help='layout of masks/ (default auto: detected per data root): json = SAM coco_rle files '
                             '<stem>.json; segmae = the original code\'s <stem>/table.txt + PNGs; amg = '
                             'segment-anything amg.py folders <stem>/metadata.csv + 0.png, 1.png, ...')
    parser.add_argument('--save_freq', default=20, type=positive_int,
                        help='save a checkpoint every N epochs (and after the last)')
    parser.add_argument('--grad_checkpointing', action='store_true',
                        help='activation checkpointing of the transformer blocks (ViT-L/H at large batch)')
    parser.add_argument('--data_backend', default='cpu', choices=DATA_BACKENDS,
                        help='cpu: workers decode and augment (Pillow); gpu: workers only read the files, the '
                             'batch is decoded (nvjpeg) and cropped on the training device: same crops, flips '
                             'and masks, for when the CPU cores cannot keep up with the GPU')
    parser.add_argument('--fp8', action='store_true',
                        help='FP8 matmuls in the transformer Linear layers (torchao; Hopper/Ada GPUs)')
    parser.add_argument('--log_freq', default=None, type=positive_int, metavar='N',
                        help='TensorBoard: loss, lr and the reconstruction grid every N iterations (Union14M\'s '
                             'flag; default: loss and lr at each printed line, the grid every --vis_freq epochs)')
    parser.add_argument('--vis_freq', default=20, type=non_negative_int,
                        help='log a grid of inputs and reconstructions to TensorBoard every N epochs (0: never)')
    parser.add_argument('--stop_epoch', default=None, type=positive_int, metavar='N',
                        help='stop (with a checkpoint) once N epochs are done, keeping the lr schedule of '
                             '--epochs: pretraining in chunks, continued later with --resume')
    parser.add_argument('--checkpoint_name', default='epoch', choices=['epoch', 'epochs_done'],
                        help="checkpoint-<epoch>.pth names files by the 0-based epoch index (the reference's "
                             "way); epochs_done by the number of epochs pretrained (checkpoint-<epoch+1>.pth)")
    parser.add_argument('--skip_bad_samples', action='store_true',
                        help='skip unreadable images / mask files (counted and listed at the end of each '
                             'epoch) instead of stopping')
    parser.add_argument('--skip_nonfinite', default=0, type=non_negative_int, metavar='N',
                        help='skip up to N optimizer steps per epoch whose loss is NaN/inf (logged) instead of '
                             'stopping at the first; costs one host-device sync per step')
    parser.add_argument('--allow_missing_masks', action='store_true',
                        help='skip images without a mask file instead of stopping')
    parser.add_argument('--mask_size_check', default=DEFAULT_MASK_SIZE_CHECK, type=non_negative_int, metavar='N',
                        help='at start-up, check the chosen mask of N images spread over the set against the '
                             f'image headers (0: every image; default {DEFAULT_MASK_SIZE_CHECK})')
    parser.add_argument('--stack', default='', metavar='CHECKPOINT',
                        help='start from an official MAE checkpoint (e.g. mae_pretrain_vit_base.pth) with any '
                             'mask method: a 4th input channel starts at zero weight, the pre-encoder at identity; '
                             'also a four_channels checkpoint of the original segmae code (converted)')
    parser.add_argument('--data_format', default='auto', choices=['auto', 'folders', 'shards'],
                        help='folders: each --data_path holds train/ (and masks/); shards: tar shards (a folder of '
                             '.tar files, a .tar or a pattern like train-{000000..000099}.tar), as '
                             'tools/write_shards.py writes them or as SA-1B ships them; auto: by the path')
    parser.add_argument('--shuffle_buffer', default=DEFAULT_SHUFFLE_BUFFER, type=non_negative_int, metavar='N',
                        help='with shards: samples each loader worker shuffles across its shards (0: none)')
    add_mask_channel_arg(parser)
    return parser


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Errors that depend on several flags, before any data is read."""
    check_model_and_input_size(args, parser, models_mae.model_patch_size, models_mae.default_input_size)
    check_optimizer_args(args, parser, ("adamw",), default_betas=(0.9, 0.95))
    recipe = TEXT_LINE_RECIPE if args.model in models_mae.TEXT_LINE_MODELS else REFERENCE_RECIPE
    for key, default in recipe.items():
        setattr(args, key, getattr(args, key) or default)
    method = get_method(args.mask_method)
    if method.drops_tokens and args.mask_ratio == 0:
        parser.error("--mask_ratio 0 hides no patch: the loss is 0 and nothing is learned; use e.g. 0.75")
    if args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} >= --epochs {args.epochs}: there is no epoch to train")
    given = set(getattr(args, "given_flags", []))
    if not method.drops_tokens and "mask_ratio" in given:
        print(f"WARNING: --mask_ratio is ignored by --mask_method {args.mask_method}: the SAM segment decides "
              f"what is hidden (see --coverage_ratio)", file=sys.stderr)
    if not method.needs_segment and "coverage_ratio" in given:
        print(f"WARNING: --coverage_ratio is ignored by --mask_method {args.mask_method} (it chooses SAM segments)",
              file=sys.stderr)
    if args.warmup_epochs > args.epochs:
        print(f"WARNING: --warmup_epochs {args.warmup_epochs} > --epochs {args.epochs}: the learning rate "
              f"never reaches its peak", file=sys.stderr)


MASK_NOTES = {  # what the mask readers repaired, said once per run (counted over one epoch, every rank)
    "rotated": "mask(s) had the transposed size of an image with EXIF orientation 5-8 (made on the rotated "
               "picture, as SAM's amg.py does) and were rotated into the image's frame",
    "thresholded": "mask PNG(s) were not strictly 0/255 (resampled or antialiased) and were thresholded at 128",
    "unsorted": "segmae table.txt file(s) were not sorted by coverage: they were sorted before choosing (the "
                "original code would have picked from the unsorted order)"}


def tell_mask_notes(dataset, told: set[str]) -> None:
    for key, count in dataset.mask_notes().items():
        if key in told:
            continue
        total = round(all_reduce_mean(float(count)) * get_world_size())
        if total:
            print(f"NOTE: {total} {MASK_NOTES[key]}")
            told.add(key)


def seg_loss_of_older_checkpoint(args: argparse.Namespace) -> None:
    """Checkpoints written before --seg_loss existed trained with the per-patch loss: a resumed
    run keeps it (unless the flag asks otherwise, which is an error like any other conflict)."""
    if not args.resume:
        return
    saved = load_checkpoint(args.resume).get("args")
    if saved is None or hasattr(saved, "seg_loss") or not hasattr(saved, "in_chans"):
        return  # new checkpoints record it; the original's and the reference's are refused or patches
    if "seg_loss" in set(getattr(args, "given_flags", [])) and args.seg_loss != "patch":
        raise UserError(f"{args.resume} was trained with the per-patch loss (it predates --seg_loss, whose "
                         f"default is now pixel): pass --seg_loss patch (or leave it out) to continue it, or "
                         f"start a new run in another output folder")
    print(f"--seg_loss patch taken from {args.resume} (written before --seg_loss existed)")
    args.seg_loss = "patch"


def log_reconstructions(log_writer, model, dataset, run: Runtime, args, epoch: int, n: int = 4,
                        tag: str = "train/reconstructions") -> None:
    """TensorBoard image 'reconstructions': the first n training images, what the encoder saw and
    what the model made of it (evals/visualize.py)."""
    import numpy as np
    count = min(n, len(dataset))
    if hasattr(dataset, "preview"):  # shards: the first samples of the first shard
        samples, rows = dataset.preview(count)
    else:
        samples = [dataset[i] for i in range(count)]
        rows = [dataset.folders[0].name(i) if len(dataset.folders) == 1 else f"image {i}" for i in range(count)]
    imgs, seg, _ = collate_pretrain(samples)
    if imgs is None:
        return
    device, amp = run.device, run.amp
    imgs = imgs.to(device)
    seg = seg.to(device) if seg is not None else None
    with autocast(device, amp):
        panels = reconstruction_panels(model, imgs, seg, args.mask_ratio, args.normalization)
    grid = labelled_grid(panels.float(), panel_titles(args.mask_method), rows)
    log_writer.add_image(tag, np.asarray(grid), epoch, dataformats="HWC")


def log_reconstructions_mid_epoch(log_writer, model, dataset, run: Runtime, args, epoch_1000x: int) -> None:
    """--log_freq: the reconstruction grid at a training step (tag train/reconstructions_1000x),
    without touching the training's random numbers or leaving the model in eval mode."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        log_reconstructions(log_writer, model, dataset, run, args, epoch_1000x, tag="train/reconstructions_1000x")
    model.train(True)


def continue_as_written(args: argparse.Namespace, checkpoint: dict) -> None:
    """A resumed checkpoint written before a model name or a flag changed meaning continues as it
    was trained: under the model's explicit name, with the reference's recipe."""
    state = checkpoint.get("model", {})
    name = models_mae.model_of_checkpoint(args.model, state)
    if name != args.model:
        print(f"{args.resume} holds the model now named {name} (its decoder is {state['decoder_embed.weight'].shape[0]}"
              f" wide; {args.model} is now Union14M's): continuing it as {name}")
        args.model = name
    saved = checkpoint.get("args")
    for key, before in REFERENCE_RECIPE.items():
        if saved is not None and not hasattr(saved, key) and key not in getattr(args, "given_flags", []):
            setattr(args, key, before)  # a run from before the flag existed


def reconcile_run(args: argparse.Namespace) -> None:
    """Auto-resume (only the run this command starts); the flags that define the run must be the
    checkpoint's (a default is taken from it)."""
    auto_resume(args, run_start(args, files=RUN_START_FILES))
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        refuse_original_to_continue(checkpoint, args.resume, "--resume")
    reconcile_with_checkpoint(args, RUN_FLAGS, saved=checkpoint.get("args") if checkpoint is not None else None)
    if checkpoint is not None:
        continue_as_written(args, checkpoint)
    method_flags = get_method(args.mask_method).run_flags
    if "seg_loss" in method_flags:
        seg_loss_of_older_checkpoint(args)
    reconcile_with_checkpoint(args, list(method_flags))


def uses_shards(args: argparse.Namespace) -> bool:
    if args.data_format != "auto":
        return args.data_format == "shards"
    kinds = {is_shard_path(p) for p in args.data_path}
    if len(kinds) > 1:
        raise UserError(f"--data_path mixes tar shards and folders with train/ ({' '.join(args.data_path)}): "
                        f"write the folders as shards (tools/write_shards.py) or train on each kind apart")
    return kinds.pop()


def build_shard_data(args: argparse.Namespace, device: torch.device, transform):
    """(dataset, None, the loader) of pretraining samples read from tar shards (inputs/shards.py)."""
    with local_main_first():  # the first rank counts the samples of unindexed tars and saves the counts
        dataset = build_shard_dataset(args.data_path, transform, uses_segments(args.mask_method), args.coverage_ratio,
                                      args.batch_size, get_world_size(), get_rank(), args.seed, args.shuffle_buffer,
                                      args.skip_bad_samples, decode=transform.decodes_in_workers)
    print(dataset)
    check_ranks_agree(args, {"images": (dataset.total, [dataset.digest()])})
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, drop_last=True,
                                         pin_memory=args.pin_mem and device.type == "cuda",
                                         collate_fn=collate_pretrain,
                                         **loader_options(args.num_workers, args.prefetch_factor))
    if args.data_backend == "gpu":
        loader = DevicePrefetcher(loader, device)
    return dataset, None, loader


def build_data(args: argparse.Namespace, device: torch.device):
    """(dataset, its DistributedSampler (None for shards), the loader) of the pretraining images
    (and masks)."""
    transform = build_pretrain_transform(as_hw(args.input_size), args.data_backend, args.augment, args.normalization)
    if uses_shards(args):
        return build_shard_data(args, device, transform)
    with local_main_first():
        dataset = build_pretrain_dataset(args.data_path, transform, with_masks=uses_segments(args.mask_method),
                                         coverage_ratio=args.coverage_ratio, allow_missing_masks=args.allow_missing_masks,
                                         seed=args.seed, skip_bad_samples=args.skip_bad_samples,
                                         read_timeout=args.data_timeout, mask_format=args.mask_format,
                                         mask_size_check=args.mask_size_check)
    print(dataset)
    check_ranks_agree(args, {"images": (len(dataset), [f.digest() for f in dataset.folders])})
    num_tasks = get_world_size()
    # A seeded DistributedSampler also for one process: its order depends only on (seed, epoch).
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=num_tasks, rank=get_rank(), shuffle=True,
                                                  seed=args.seed)
    if len(dataset) < args.batch_size * num_tasks:
        raise SystemExit(f"only {len(dataset)} images for a global batch of "
                         f"{args.batch_size * num_tasks}: lower --batch_size")
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size,
                                         pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
                                         collate_fn=collate_pretrain,
                                         **loader_options(args.num_workers, args.prefetch_factor))
    if args.data_backend == "gpu":  # decode and crop batch k+1 on the device while step k runs
        loader = DevicePrefetcher(loader, device)
    return dataset, sampler, loader


def build_model(args: argparse.Namespace, run: Runtime):
    """(model to train: compiled / DDP-wrapped, the plain model, optimizer, loss scaler), resumed
    or stacked on an official checkpoint where asked."""
    input_size = as_hw(args.input_size)
    model = models_mae.build_mae(args.model, img_size=input_size, norm_pix_loss=args.norm_pix_loss,
                                 mask_method=args.mask_method, grad_checkpointing=args.grad_checkpointing,
                                 seg_loss=args.seg_loss)
    # recorded in the checkpoint's args for finetuning / segmentation
    args.in_chans = model.encoder_in_chans
    args.fourth_channel = "visible"  # a mask channel holds v = 1 - m (the original segmae code's: m)
    args.input_size = list(input_size)
    device = run.device
    model.to(device)
    if args.fp8:
        print(f"FP8: {convert_to_fp8(model, device)} Linear layers converted")
    model_without_ddp = model
    runsetup.log_details(args, "model.txt", f"Model = {model_without_ddp}", f"{args.model} structure")
    runsetup.set_lr_from_blr(args)
    model = runsetup.wrap_model(model, run)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay,
                                             model_without_ddp.no_weight_decay_keys())
    optimizer = build_optimizer(args, param_groups, device)
    runsetup.log_details(args, "optimizer.txt", str(optimizer), "optimizer")
    loss_scaler = misc.LossScaler(enabled=run.amp == "fp16")
    if args.stack and not args.resume:
        stack_official_into_mae(model_without_ddp, args.stack, args.mask_channel)
    load_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler)
    return model, model_without_ddp, optimizer, loss_scaler


def end_epoch(args, epoch: int, last_epoch: int, train_stats: dict, model_without_ddp, optimizer, loss_scaler,
              dataset, run: Runtime, log_writer) -> None:
    """The log row, then the checkpoint (a failed or killed save only repeats the epoch and its
    row), then TensorBoard."""
    if args.output_dir:
        append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
    if args.output_dir and (epoch % args.save_freq == 0 or epoch + 1 == last_epoch):
        save_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
                   epoch=epoch, name=str(epoch + 1) if args.checkpoint_name == "epochs_done" else None, run=run)
    if log_writer is not None and args.vis_freq and (epoch + 1) % args.vis_freq == 0:
        log_reconstructions(log_writer, model_without_ddp, dataset, run, args, epoch)
    if log_writer is not None:
        for key in ("img_per_sec", "empty_segments", "bad_samples"):
            if key in train_stats:
                log_writer.add_scalar(f"train/{key}", train_stats[key], epoch)
        log_writer.flush()


def main(args: argparse.Namespace) -> None:
    run = runsetup.setup_run(args, __file__)
    reconcile_run(args)
    dataset_train, sampler_train, data_loader_train = build_data(args, run.device)
    log_writer = runsetup.tensorboard_writer(args.log_dir)
    model, model_without_ddp, optimizer, loss_scaler = build_model(args, run)

    last_epoch = min(args.epochs, args.stop_epoch or args.epochs)
    if not runsetup.check_trains_something(args, len(data_loader_train), last_epoch):
        return
    print(f"Start training for {args.epochs} epochs ({args.mask_method}, amp {run.amp})")
    start_time = time.time()
    told: set[str] = set()
    for epoch in range(args.start_epoch, last_epoch):
        runsetup.seed_epoch(args.seed, epoch, get_rank())
        if sampler_train is not None:
            sampler_train.set_epoch(epoch)
        dataset_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, data_loader_train, optimizer, run, epoch, loss_scaler,
                                      log_writer=log_writer, args=args,
                                      log_images=lambda x: log_reconstructions_mid_epoch(
                                          log_writer, model_without_ddp, dataset_train, run, args, x))
        if dataset_train.with_masks:
            tell_mask_notes(dataset_train, told)
        end_epoch(args, epoch, last_epoch, train_stats, model_without_ddp, optimizer, loss_scaler, dataset_train,
                  run, log_writer)

    runsetup.print_weights_fingerprint(model_without_ddp)
    total_time = time.time() - start_time
    print(f'Training time {datetime.timedelta(seconds=int(total_time))}')
    if log_writer is not None:
        log_writer.close()


def cli(argv: list[str] | None = None):
    return runsetup.run_cli(get_args_parser(), check_args, main, argv)


if __name__ == '__main__':
    cli()
