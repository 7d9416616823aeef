"""MAE pretraining with random patches or SAM segments as masks.

    python main_pretrain.py --data_path DIR --mask_method four_channels --model mae_vit_base_patch16
    torchrun --nproc_per_node 8 main_pretrain.py ...   (same command on N GPUs)
"""
from __future__ import annotations

import argparse
import datetime
import os
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
from inputs.roots import LMDB, root_kind
from inputs.shards import DEFAULT_SHUFFLE_BUFFER, build_shard_dataset, is_shard_path
from inputs.transforms import DATA_BACKENDS, REFERENCE_RECIPE, TEXT_LINE_RECIPE, add_recipe_args, as_hw
from mask_methods import MaskMethod, add_method_args, build_method, method_flags, uses_segments, warn_ignored_flags
from models_vit import stack_official_into_mae
from run.checkpoint import (FOURTH_CHANNEL_KEY, Resumed, append_log, check_writable_names, load_checkpoint, open_resume,
                            resume_states, resumed_identity, run_start, save_model)
from run.distributed import check_ranks_agree, local_main_first
from run.flags import (add_mask_channel_arg, add_training_args, check_model_and_input_size, check_optimizer_args,
                       non_negative_float, non_negative_int, positive_int)
from run.setup import Runtime, build_optimizer, convert_to_fp8
from run.tracking import tracking_writer
from sam.listing import MASK_FORMATS
from util.lr_decay import param_groups_weight_decay
from util.misc import UserError, all_reduce_mean, autocast, get_rank, get_world_size

# What defines a pretraining run, with each flag's value in this repo's checkpoints written before it
# existed (None: it always was recorded); a mask method's own flags join them (mask_methods.Flag).
RUN_FLAGS = {"model": None, "mask_method": None, "norm_pix_loss": None, "input_size": None,
             **REFERENCE_RECIPE}  # the recipe before --augment / --normalization: the reference's
RUN_START_FILES = ["stack"]  # auto-resume continues only a run that started from the same --stack file


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE pre-training', add_help=False)
    add_training_args(parser)
    add_recipe_args(parser)
    parser.add_argument('--model', default='mae_vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train')
    parser.add_argument('--norm_pix_loss', action='store_true',
                        help='Use (per-patch) normalized pixels as targets for computing loss')
    parser.set_defaults(norm_pix_loss=False)
    add_method_args(parser)
    parser.add_argument('--mask_format', default='auto', choices=("auto",) + MASK_FORMATS,
                        help='layout of masks/ (default auto: detected per data root): json = SAM coco_rle files '
                             '<stem>.json; segmae = the original code\'s <stem>/table.txt + PNGs; amg = '
                             'segment-anything amg.py folders <stem>/metadata.csv + 0.png, 1.png, ...')
    parser.add_argument('--save_freq', default=20, type=non_negative_int,
                        help='save a checkpoint every N epochs, from the first (epochs 0, N, 2N, ...), and after the '
                             'last (of --stop_epoch too); 0: after the last only')
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
                        help='skip unreadable images / mask files (counted at the end of each epoch and listed '
                             'in bad_samples.txt) instead of stopping')
    parser.add_argument('--max_bad_percent', default=1.0, type=non_negative_float, metavar='P',
                        help='with --skip_bad_samples: stop once more than P %% of an epoch\'s samples were '
                             'skipped (never for 10 or fewer; 100: never)')
    parser.add_argument('--skip_nonfinite', default=0, type=non_negative_int, metavar='N',
                        help='skip up to N optimizer steps per epoch whose loss is NaN/inf (logged) instead of '
                             'stopping at the first; costs one host-device sync per step')
    parser.add_argument('--allow_missing_masks', action='store_true',
                        help='skip images without a mask file instead of stopping')
    parser.add_argument('--mask_size_check', default=DEFAULT_MASK_SIZE_CHECK, type=non_negative_int, metavar='N',
                        help='at start-up, check the masks of N images spread over the set against the image '
                             f'headers (0: every image; default {DEFAULT_MASK_SIZE_CHECK})')
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


def check_before_submitting(args: argparse.Namespace) -> None:
    """What a SLURM job would find wrong at its start, checked where it is submitted (submitit_pretrain.py),
    so that it does not wait in the queue to fail: each --data_path root's layout, masks/ for the
    segment methods, the --resume and --stack files."""
    for root in args.data_path:
        if is_shard_path(root):
            continue
        kind = root_kind(root)
        if uses_segments(args.mask_method) and kind != LMDB and not os.path.isdir(os.path.join(root, "masks")):
            raise UserError(f"--data_path {root} has no masks/ folder, which --mask_method {args.mask_method} needs: "
                            f"generate SAM masks for it (tools/generate_masks.py), or pass --mask_method patches")
    for flag in ("resume", "stack"):
        path = getattr(args, flag, "")
        if path and not os.path.isfile(path):
            raise UserError(f"--{flag} {path} does not exist (checked before submitting)")
    if args.resume:
        load_checkpoint(args.resume)  # a truncated or foreign file is named here, not after the queue


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Errors that depend on several flags, before any data is read."""
    check_model_and_input_size(args, parser, models_mae.model_patch_size, models_mae.default_input_size,
                               models_mae.own_model_name)
    check_optimizer_args(args, parser, ("adamw",), default_betas=(0.9, 0.95))
    recipe = TEXT_LINE_RECIPE if args.model in models_mae.TEXT_LINE_MODELS else REFERENCE_RECIPE
    for key, default in recipe.items():
        setattr(args, key, getattr(args, key) or default)
    try:
        build_method(args)  # its parameters' values are checked by the method
    except ValueError as e:
        parser.error(str(e))
    if args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} >= --epochs {args.epochs}: there is no epoch to train")
    warn_ignored_flags(args)
    given = set(getattr(args, "given_flags", ()))
    if "mask_format" in given and not build_method(args).needs_segment:
        print(f"WARNING: --mask_format is ignored by --mask_method {args.mask_method}, which reads no masks",
              file=sys.stderr)
    if args.resume and args.stack and {"resume", "stack"} <= given:
        parser.error(f"--resume {args.resume} continues a run (its weights and optimizer) and --stack {args.stack} "
                     f"starts one from an official checkpoint: pass only one (resuming a run that started with "
                     f"--stack needs only --resume)")
    if args.warmup_epochs > args.epochs:
        print(f"WARNING: --warmup_epochs {args.warmup_epochs} > --epochs {args.epochs}: the learning rate "
              f"never reaches its peak", file=sys.stderr)


MASK_NOTES = {  # what the readers met and repaired, said once per run (counted over one epoch, every rank)
    "oriented": "image(s) read in this epoch have an EXIF orientation other than 1 (phone photos): training uses "
                "their stored pixels, as the reference MAE does, so they train sideways or upside down. To train "
                "them upright, bake the rotation in (python tools/check_dataset.py prints the command), then "
                "regenerate their masks",
    "rotated": "mask(s) were made on the displayed picture of an image with an EXIF orientation (as SAM's amg.py "
               "makes them) and were mapped into the image's stored pixels",
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


def method_run_flags(args: argparse.Namespace) -> dict:
    """The flags of --mask_method's class, with their values before they existed."""
    own = {f.name for f in build_method(args).flags}
    return {name: flag.before for name, flag in method_flags().items() if name in own}


def continue_as_written(args: argparse.Namespace, checkpoint: dict, path: str) -> None:
    """A checkpoint that records a model name whose model changed since (Union14M's
    mae_vit_small_patch4) continues as the model its weights are, under that one's explicit name."""
    state = checkpoint.get("model", {})
    name = models_mae.model_of_checkpoint(args.model, state)
    if name != args.model:
        print(f"{path} holds the model now named {name} (its decoder is {state['decoder_embed.weight'].shape[0]}"
              f" wide; {args.model} is now Union14M's): continuing it as {name}")
        args.model = name


def run_config(args: argparse.Namespace, model, start: dict) -> dict:
    """The checkpoint's record of the run (run.checkpoint: ``config``): what finetuning, the
    Segmenter, kNN, exports and the pictures need of it, and where it started."""
    return {"model": args.model, "input_size": list(as_hw(args.input_size)), "in_chans": model.encoder_in_chans,
            FOURTH_CHANNEL_KEY: "visible",  # a mask channel holds v = 1 - m (the original segmae code's: m)
            "mask_method": model.method.name, "method": model.method.params(), "augment": args.augment,
            "normalization": args.normalization, "norm_pix_loss": args.norm_pix_loss, "run_start": start}


def uses_shards(args: argparse.Namespace) -> bool:
    if args.data_format != "auto":
        return args.data_format == "shards"
    kinds = {is_shard_path(p) for p in args.data_path}
    if len(kinds) > 1:
        raise UserError(f"--data_path mixes tar shards and folders with train/ ({' '.join(args.data_path)}): "
                        f"write the folders as shards (tools/write_shards.py) or train on each kind apart")
    return kinds.pop()


def build_shard_data(args: argparse.Namespace, device: torch.device, transform, method: MaskMethod,
                     resumed: Resumed | None = None):
    """(dataset, None, the loader) of pretraining samples read from tar shards (inputs/shards.py)."""
    with local_main_first():  # the first rank counts the samples of unindexed tars and saves the counts
        dataset = build_shard_dataset(args.data_path, transform, method.needs_segment, None, args.batch_size,
                                      get_world_size(), get_rank(), args.seed, args.shuffle_buffer,
                                      args.skip_bad_samples, decode=transform.decodes_in_workers,
                                      segment_choice=method)
    print(dataset)
    check_ranks_agree(args, {"images": (dataset.total, [dataset.digest()]), **resumed_identity(resumed)})
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, drop_last=True,
                                         pin_memory=args.pin_mem and device.type == "cuda",
                                         collate_fn=collate_pretrain,
                                         **loader_options(args.num_workers, args.prefetch_factor))
    if args.data_backend == "gpu":
        loader = DevicePrefetcher(loader, device)
    return dataset, None, loader


def build_data(args: argparse.Namespace, device: torch.device, method: MaskMethod, resumed: Resumed | None = None):
    """(dataset, its DistributedSampler (None for shards), the loader) of the pretraining images
    (and what ``method`` hides of each); the ranks check that they agree on the images and on the
    checkpoint they continue (``resumed``)."""
    transform = build_pretrain_transform(as_hw(args.input_size), args.data_backend, args.augment, args.normalization)
    if uses_shards(args):
        return build_shard_data(args, device, transform, method, resumed)
    with local_main_first():
        dataset = build_pretrain_dataset(args.data_path, transform, with_masks=method.needs_segment,
                                         allow_missing_masks=args.allow_missing_masks, seed=args.seed,
                                         skip_bad_samples=args.skip_bad_samples, read_timeout=args.data_timeout,
                                         mask_format=args.mask_format, mask_size_check=args.mask_size_check,
                                         segment_choice=method)
    print(dataset)
    check_ranks_agree(args, {"images": (len(dataset), [f.digest() for f in dataset.folders]),
                             **resumed_identity(resumed)})
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


def build_model(args: argparse.Namespace, run: Runtime, method: MaskMethod, resumed: Resumed | None):
    """(model to train: compiled / DDP-wrapped, the plain model, optimizer, loss scaler, first
    epoch), resumed, or stacked on an official checkpoint where asked."""
    model = models_mae.build_mae(args.model, img_size=as_hw(args.input_size), norm_pix_loss=args.norm_pix_loss,
                                 mask_method=method, grad_checkpointing=args.grad_checkpointing)
    device = run.device
    model.to(device)
    if args.fp8:
        print(f"FP8: {convert_to_fp8(model, device)} Linear layers converted")
    model_without_ddp = model
    runsetup.log_details(args, "model.txt", f"Model = {model_without_ddp}", f"{args.model} structure")
    runsetup.set_lr_from_blr(args, resumed.args if resumed is not None else None)
    model = runsetup.wrap_model(model, run)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay,
                                             model_without_ddp.no_weight_decay_keys())
    optimizer = build_optimizer(args, param_groups, device)
    runsetup.log_details(args, "optimizer.txt", str(optimizer), "optimizer")
    loss_scaler = misc.LossScaler(enabled=run.amp == "fp16")
    start_epoch = args.start_epoch
    if resumed is not None:
        if args.stack:  # auto-resume of a run that started from --stack: the run's own weights win
            print(f"--stack {args.stack} is not loaded: the run it started continues from {resumed.path}")
        start_epoch = resume_states(resumed, model_without_ddp, optimizer, loss_scaler) or start_epoch
    elif args.stack:
        stack_official_into_mae(model_without_ddp, args.stack, args.mask_channel)
    return model, model_without_ddp, optimizer, loss_scaler, start_epoch


def saves_checkpoint(args: argparse.Namespace, epoch: int, last_epoch: int) -> bool:
    return bool(args.output_dir) and ((args.save_freq > 0 and epoch % args.save_freq == 0) or epoch + 1 == last_epoch)


def checkpoint_names(args: argparse.Namespace, start_epoch: int, last_epoch: int) -> list[str]:
    """The checkpoint files the epochs from start_epoch to last_epoch will write."""
    return [f"checkpoint-{epoch + 1 if args.checkpoint_name == 'epochs_done' else epoch}.pth"
            for epoch in range(start_epoch, last_epoch) if saves_checkpoint(args, epoch, last_epoch)]


def end_epoch(args, epoch: int, last_epoch: int, train_stats: dict, model_without_ddp, optimizer, loss_scaler,
              dataset, run: Runtime, log_writer, config: dict) -> None:
    """The log row, then the checkpoint (a failed or killed save only repeats the epoch and its
    row), then TensorBoard."""
    if args.output_dir:
        append_log(args.output_dir, {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch})
    if saves_checkpoint(args, epoch, last_epoch):
        save_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
                   epoch=epoch, name=str(epoch + 1) if args.checkpoint_name == "epochs_done" else None, run=run,
                   config=config)
    if log_writer is not None and args.vis_freq and (epoch + 1) % args.vis_freq == 0:
        log_reconstructions(log_writer, model_without_ddp, dataset, run, args, epoch)
    if log_writer is not None:
        for key in ("img_per_sec", "empty_segments", "bad_samples"):
            if key in train_stats:
                log_writer.add_scalar(f"train/{key}", train_stats[key], epoch)
        log_writer.flush()


def main(args: argparse.Namespace) -> None:
    run = runsetup.setup_run(args, __file__)
    start = run_start(args, files=RUN_START_FILES)
    resumed = open_resume(args, RUN_FLAGS, start, then=method_run_flags, upgrade=continue_as_written)
    method = build_method(args)
    dataset_train, sampler_train, data_loader_train = build_data(args, run.device, method, resumed)
    log_writer = tracking_writer(args, "pretrain")
    model, model_without_ddp, optimizer, loss_scaler, start_epoch = build_model(args, run, method, resumed)
    config = run_config(args, model_without_ddp, resumed.run_start if resumed is not None else start)

    last_epoch = min(args.epochs, args.stop_epoch or args.epochs)
    if not runsetup.check_trains_something(args, len(data_loader_train), last_epoch, start_epoch):
        return
    if args.output_dir:  # never write over a file that could not be read
        check_writable_names(args.output_dir, checkpoint_names(args, start_epoch, last_epoch))
    print(f"Start training for {args.epochs} epochs ({method}, amp {run.amp})")
    start_time = time.time()
    told: set[str] = set()
    for epoch in range(start_epoch, last_epoch):
        runsetup.seed_epoch(args.seed, epoch, get_rank())
        if sampler_train is not None:
            sampler_train.set_epoch(epoch)
        dataset_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, data_loader_train, optimizer, run, epoch, loss_scaler,
                                      log_writer=log_writer, args=args,
                                      log_images=lambda x: log_reconstructions_mid_epoch(
                                          log_writer, model_without_ddp, dataset_train, run, args, x))
        tell_mask_notes(dataset_train, told)
        end_epoch(args, epoch, last_epoch, train_stats, model_without_ddp, optimizer, loss_scaler, dataset_train,
                  run, log_writer, config)

    runsetup.print_weights_fingerprint(model_without_ddp)
    total_time = time.time() - start_time
    print(f'Training time {datetime.timedelta(seconds=int(total_time))}')
    if log_writer is not None:
        log_writer.close()


def cli(argv: list[str] | None = None):
    return runsetup.run_cli(get_args_parser(), check_args, main, argv)


if __name__ == '__main__':
    cli()
