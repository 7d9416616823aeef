"""Finetune a pretrained encoder (any mask method, or an official MAE checkpoint) for image
classification, or evaluate a finetuned checkpoint.

    python main_finetune.py --finetune pretrain/checkpoint-799.pth --data_path DIR --model vit_base_patch16
    python main_finetune.py --eval --resume finetune/checkpoint-best.pth --data_path DIR --model vit_base_patch16
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import time

import numpy as np
import torch
from timm.data.mixup import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import run.setup as runsetup
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from evals.report import FINETUNE_RESULT
from inputs.classification import build_classification_datasets, build_finetune_transform
from inputs.pretrain import loader_options
from inputs.transforms import REFERENCE_RECIPE, add_recipe_args, as_hw
from mask_methods import MASK_METHODS
from models_vit import downstream_in_chans, load_pretrained_encoder, resolve_mask_method
from run.checkpoint import (CheckpointError, Resumed, append_log, check_writable_names, checkpoint_config,
                            load_checkpoint, open_resume, resume_states, resumed_identity, run_start, save_model)
from run.distributed import check_ranks_agree, local_main_first
from run.files import atomic_write_json
from run.flags import (add_downstream_args, add_training_args, check_model_and_input_size, check_optimizer_args,
                       fraction_below_one, non_negative_float, non_negative_int)
from run.setup import Runtime, build_optimizer
from run.tracking import tracking_writer
from util.lr_decay import param_groups_layer_decay
from util.misc import UserError, get_rank, get_world_size, is_main_process

# What defines a finetuned model (a resumed or evaluated checkpoint supplies them unless given), with
# each flag's value in checkpoints written before it existed; and the file a run starts from
# (auto-resume continues only a run from the same --finetune file).
RUN_FLAGS = {"model": None, "nb_classes": None, "input_size": None, "global_pool": None, "train_subset": None,
             **REFERENCE_RECIPE}
RUN_START_FILES = ["finetune"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE fine-tuning for image classification', add_help=False)
    add_training_args(parser)
    add_recipe_args(parser)
    parser.set_defaults(epochs=50, warmup_epochs=5, min_lr=1e-6, blr=1e-3)
    parser.add_argument('--model', default='vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train')
    parser.add_argument('--drop_path', type=fraction_below_one, default=0.1, metavar='PCT',
                        help='Drop path rate, in [0, 1) (default: 0.1)')
    parser.add_argument('--clip_grad', type=non_negative_float, default=None, metavar='NORM',
                        help='Clip gradient norm (default: None, no clipping)')
    parser.add_argument('--layer_decay', type=non_negative_float, default=0.75,
                        help='layer-wise lr decay from ELECTRA/BEiT')

    # Augmentation parameters
    parser.add_argument('--color_jitter', type=float, default=None, metavar='PCT',
                        help='Color jitter factor (enabled only when not using Auto/RandAug)')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='Use AutoAugment policy. "v0" or "original". " + "(default: rand-m9-mstd0.5-inc1)')
    parser.add_argument('--smoothing', type=fraction_below_one, default=0.1,
                        help='Label smoothing, in [0, 1) (default: 0.1)')

    # * Random Erase params
    parser.add_argument('--reprob', type=non_negative_float, default=0.25, metavar='PCT',
                        help='Random erase prob (default: 0.25)')
    parser.add_argument('--remode', type=str, default='pixel',
                        help='Random erase mode (default: "pixel")')
    parser.add_argument('--recount', type=non_negative_int, default=1,
                        help='Random erase count (default: 1)')
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='Do not random erase first (clean) augmentation split')

    # * Mixup params
    parser.add_argument('--mixup', type=non_negative_float, default=0,
                        help='mixup alpha, mixup enabled if > 0.')
    parser.add_argument('--cutmix', type=non_negative_float, default=0,
                        help='cutmix alpha, cutmix enabled if > 0.')
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None,
                        help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    parser.add_argument('--mixup_prob', type=float, default=1.0,
                        help='Probability of performing mixup or cutmix when either/both is enabled')
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5,
                        help='Probability of switching to cutmix when both mixup and cutmix enabled')
    parser.add_argument('--mixup_mode', type=str, default='batch', choices=['batch', 'pair', 'elem'],
                        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    add_downstream_args(parser, MASK_METHODS)
    parser.set_defaults(global_pool=True)
    return parser


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    check_optimizer_args(args, parser, ("adamw",), default_betas=(0.9, 0.999))
    check_downstream_args(args, parser)


def check_downstream_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What finetuning and linear probing both check."""
    check_model_and_input_size(args, parser, models_vit.model_patch_size, models_vit.default_input_size,
                               models_vit.own_model_name)
    if args.eval and not args.resume:
        parser.error("--eval needs --resume CHECKPOINT (a finetuned or probed model)")
    if not args.eval and args.start_epoch >= args.epochs:
        parser.error(f"--start_epoch {args.start_epoch} >= --epochs {args.epochs}: there is no epoch to train")
    if getattr(args, "cutmix_minmax", None) is not None and len(args.cutmix_minmax) != 2:
        parser.error("--cutmix_minmax takes two values: min max")


def take_pretraining_size(args: argparse.Namespace, pretrained_config: dict) -> None:
    """No --input_size given, a new run: the size the encoder was pretrained at (text lines stay 32 x
    128), when --model's patch divides it."""
    pretrained = pretrained_config.get("input_size")
    if not pretrained or "input_size" in getattr(args, "given_flags", []):
        return
    hw = list(as_hw(pretrained))
    if hw != list(as_hw(args.input_size)) and all(side % models_vit.model_patch_size(args.model) == 0 for side in hw):
        print(f"--input_size {hw[0]} {hw[1]} taken from {args.finetune} (the size it was pretrained at)")
        args.input_size = hw


def check_before_submitting(args: argparse.Namespace, script: str = "main_finetune.py") -> None:
    """What a SLURM job would find wrong at its start, checked where it is submitted (submitit_*.py),
    so that it does not wait in the queue to fail: the data folders, the checkpoint files, and that
    --finetune's encoder fits --model (shapes only: the model is built on the meta device)."""
    if len(args.data_path) != 1:
        raise UserError(f"finetuning and linear probing take one --data_path, got {len(args.data_path)}")
    root = args.data_path[0]
    for split in ("val",) if args.eval else ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"--data_path {root} has no {split}/ folder: expected {os.path.join(root, split)}"
                            f"/<class>/<image> (checked before submitting)")
    for flag in ("resume", "finetune"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UserError(f"--{flag} {path} does not exist (checked before submitting)")
    if args.resume:
        refuse_pretraining_checkpoint(args, load_checkpoint(args.resume), args.resume, script)
    elif args.finetune:
        checkpoint = load_checkpoint(args.finetune)
        method = resolve_mask_method(checkpoint, args.mask_method, args.finetune)
        encoder = models_vit.encoder_state_dict(checkpoint, method, args.fold_mask_channel, args.mask_channel,
                                                args.finetune)
        with torch.device("meta"):  # the shapes, without memory or initialisation
            model = models_vit.build_vit(args.model, img_size=as_hw(args.input_size), num_classes=args.nb_classes,
                                         global_pool=args.global_pool,
                                         in_chans=downstream_in_chans(method, args.fold_mask_channel))
        models_vit.check_encoder_fits(encoder, model, args.finetune)


def refuse_pretraining_checkpoint(args: argparse.Namespace, checkpoint: dict, path: str, script: str) -> None:
    """--resume (and --eval --resume) take what finetuning or probing wrote; a pretraining checkpoint
    there is refused with the commands that evaluate it: finetune (or probe) it, or score its encoder."""
    if not models_vit.is_pretraining_checkpoint(checkpoint):
        return
    data, path_q = " ".join(shlex.quote(d) for d in args.data_path), shlex.quote(path)
    model = models_vit.downstream_name(checkpoint)
    model_flag = f" --model {model}" if model else ""
    raise UserError(f"{path} is a pretraining checkpoint, not a finetuned or probed one: --resume"
                    f"{' with --eval' if args.eval else ''} takes what {script} wrote. Evaluate it by training on "
                    f"it first: python {script} --finetune {path_q}{model_flag} --data_path {data} --output_dir OUT "
                    f"(it reports top-1 after each epoch), or score its frozen encoder: python -m evals.knn "
                    f"--checkpoint {path_q} --data_path {data}")


class Downstream:
    """What a finetuning or linear-probing run starts from, each file read once: the checkpoint it
    continues or evaluates (``resumed``), else the pretraining checkpoint of --finetune
    (``pretrained``); the pretraining method and the input channels they give; the run's start."""

    def __init__(self, args: argparse.Namespace, script: str = "main_finetune.py"):
        self.start = run_start(args, files=RUN_START_FILES, keys=("data_path", "train_subset"))
        # auto-resume (training only) continues only a run that started from the same --finetune file;
        # the model's settings come from the checkpoint being continued or evaluated unless given
        self.resumed: Resumed | None = open_resume(args, RUN_FLAGS, self.start,
                                                   path=args.resume if args.eval else None,
                                                   accept=lambda checkpoint, path: refuse_pretraining_checkpoint(
                                                       args, checkpoint, path, script))
        self.pretrained = load_checkpoint(args.finetune) if args.finetune and self.resumed is None else None
        if self.resumed is not None:  # a finetuned checkpoint: it says which pretraining method and input it has
            config = checkpoint_config(self.resumed.checkpoint)
            self.method = resolve_mask_method(self.resumed.checkpoint, args.mask_method, self.resumed.path)
            self.in_chans = config.get("in_chans") or 3
        else:
            self.method = (resolve_mask_method(self.pretrained, args.mask_method, args.finetune)
                           if self.pretrained is not None else args.mask_method or "patches")
            self.in_chans = downstream_in_chans(self.method, args.fold_mask_channel)
            take_pretraining_recipe(args, checkpoint_config(self.pretrained) if self.pretrained else {})
        for key, default in REFERENCE_RECIPE.items():  # nothing said otherwise: the reference's
            setattr(args, key, getattr(args, key) or default)

    def config(self, args: argparse.Namespace, train) -> dict:
        """The checkpoint's record of this run (run.checkpoint: ``config``); ``train``: the training
        images (their list's digest identifies a --train_subset)."""
        return {"model": args.model, "input_size": args.input_size, "in_chans": self.in_chans,
                "mask_method": self.method, "nb_classes": args.nb_classes, "global_pool": args.global_pool,
                "augment": args.augment, "normalization": args.normalization,
                "train_images": train.samples.digest(), "classes": list(train.classes),
                "run_start": self.resumed.run_start if self.resumed is not None else self.start}

    def max_accuracy(self) -> float:
        """The best top-1 of the run being continued (0 for a new run)."""
        if self.resumed is None:
            return 0.0
        return float(self.resumed.args.get("max_accuracy", 0.0))


def build_downstream_model(args: argparse.Namespace, downstream: Downstream, **extra) -> torch.nn.Module:
    """The ViT for --model, with the input channels and adapted encoder of --finetune (if any)."""
    model = models_vit.build_vit(args.model, img_size=as_hw(args.input_size), num_classes=args.nb_classes,
                                 global_pool=args.global_pool, in_chans=downstream.in_chans, **extra)
    if downstream.pretrained is not None:
        load_pretrained_encoder(model, args.finetune, downstream.method, args.fold_mask_channel,
                                checkpoint=downstream.pretrained, mask_channel=args.mask_channel)
        trunc_normal_(model.head.weight, std=2e-5)  # manually initialize fc layer, as the reference
    return model


def take_pretraining_recipe(args: argparse.Namespace, pretrained: dict) -> None:
    """A new run: --input_size, --augment and --normalization, unless given, are the --finetune
    checkpoint's (a text-line encoder is finetuned on text lines as it was pretrained)."""
    take_pretraining_size(args, pretrained)
    for key in REFERENCE_RECIPE:
        if getattr(args, key) is None and pretrained.get(key):
            setattr(args, key, pretrained[key])
            print(f"--{key} {pretrained[key]} taken from {args.finetune}")


def match_recorded_classes(downstream: Downstream, train, val) -> None:
    """A finetuned checkpoint being continued or evaluated records its class names: the folders'
    classes must be those, or some of them (a class folder missing: each label is mapped to the
    checkpoint's class of that name, exactly); a folder it does not know (renamed, added) is
    refused, since every label after it would move to another class of its head. A checkpoint
    written before the record is not checked."""
    if downstream.resumed is None:
        return
    recorded = checkpoint_config(downstream.resumed.checkpoint).get("classes")
    if not recorded or list(train.classes) == list(recorded):
        return
    path = downstream.resumed.path
    unknown = [c for c in train.classes if c not in recorded]
    missing = [c for c in recorded if c not in train.classes]
    if unknown:
        lacks = f", and lacks {len(missing)} of its classes ({', '.join(missing[:5])})" if missing else ""
        raise CheckpointError(
            f"{path} was trained on {len(recorded)} classes; {train.root} has {len(unknown)} class folder(s) it does "
            f"not know ({', '.join(unknown[:5])}){lacks}: the labels would not be its head's. Give the folders the "
            f"names they had in training, or finetune anew from the pretrained checkpoint")
    index = {name: i for i, name in enumerate(recorded)}
    relabel = np.array([index[name] for name in train.classes], dtype=np.int64)
    for dataset in (train, val):  # val is numbered by train's classes
        dataset.samples.labels = relabel[dataset.samples.labels]
        dataset.classes, dataset.class_to_idx = list(recorded), dict(index)
    print(f"NOTE: {train.root} lacks {len(missing)} of the {len(recorded)} classes of {path} "
          f"({', '.join(missing[:5])}): the labels are mapped to its classes by name")


def build_loaders(args, build_transform, downstream: Downstream):
    with local_main_first():
        classes_fixed = downstream.resumed is not None and "nb_classes" in downstream.resumed.args
        dataset_train, dataset_val = build_classification_datasets(args, build_transform, classes_fixed)
    match_recorded_classes(downstream, dataset_train, dataset_val)
    check_ranks_agree(args, {**{f"{name} images": (len(ds), ds.samples.digest())
                                for name, ds in (("train", dataset_train), ("val", dataset_val))},
                             **resumed_identity(downstream.resumed)})
    num_tasks, global_rank = get_world_size(), get_rank()
    sampler_train = torch.utils.data.DistributedSampler(
        dataset_train, num_replicas=num_tasks, rank=global_rank, shuffle=True, seed=args.seed)
    if args.dist_eval and num_tasks > 1:
        if len(dataset_val) % num_tasks != 0:
            print('Warning: Enabling distributed evaluation with an eval dataset not divisible by process number. '
                  'This will slightly alter validation results as extra duplicate entries are added to achieve '
                  'equal num of samples per-process.')
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=num_tasks, rank=global_rank,
                                                          shuffle=False)
    else:
        # every rank evaluates the whole set; summed counts over ranks leave the accuracy unchanged
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    pin = args.pin_mem and str(args.device).startswith("cuda")
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                               pin_memory=pin, drop_last=True,
                                               **loader_options(args.num_workers, args.prefetch_factor))
    loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=args.batch_size,
                                             num_workers=args.num_workers, pin_memory=pin, drop_last=False)
    print(f"{len(dataset_train)} training and {len(dataset_val)} validation images, {len(dataset_train.classes)} classes")
    if len(dataset_train) < args.batch_size * num_tasks and not args.eval:
        raise UserError(f"only {len(dataset_train)} training images for a global batch of "
                        f"{args.batch_size * num_tasks}: lower --batch_size")
    return dataset_train, sampler_train, loader_train, loader_val


def run_training(args, model, model_without_ddp, optimizer, criterion, loss_scaler, loader_train, sampler_train,
                 loader_val, run: Runtime, downstream: Downstream, start_epoch: int, mixup_fn=None, max_norm=None,
                 kind: str = "finetune") -> dict:
    """The epoch loop shared by finetuning and linear probing (kind): train, evaluate, keep the best."""
    log_writer = tracking_writer(args, kind)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)

    max_accuracy, config = downstream.max_accuracy(), downstream.config(args, loader_train.dataset)
    if not runsetup.check_trains_something(args, len(loader_train), args.epochs, start_epoch):
        return {"max_accuracy": max_accuracy}
    if args.output_dir:  # never write over a file that could not be read
        check_writable_names(args.output_dir, ["checkpoint-best.pth"] + [
            f"checkpoint-{epoch}.pth" for epoch in range(start_epoch, args.epochs)
            if epoch % args.save_freq == 0 or epoch + 1 == args.epochs])
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        runsetup.seed_epoch(args.seed, epoch, get_rank())
        sampler_train.set_epoch(epoch)
        loader_train.dataset.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, run, epoch, loss_scaler,
                                      max_norm, mixup_fn, log_writer=log_writer, args=args)
        test_stats = evaluate(loader_val, model, run.device, run.amp)
        print(f"Accuracy of the network on the {test_stats['count']} test images: {test_stats['acc1']:.1f}%")
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f'Max accuracy: {max_accuracy:.2f}%')
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'max_accuracy': max_accuracy}
        # Order matters for a kill at any point: the log row, then the best checkpoint, then the
        # epoch checkpoint that resume continues from. A kill before the last write repeats the
        # epoch, which rewrites the row and (if it improves again) the best checkpoint.
        if args.output_dir:
            append_log(args.output_dir, log_stats)
        best = {"max_accuracy": max_accuracy}
        if args.output_dir and improved:
            save_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer,
                       loss_scaler=loss_scaler, epoch=epoch, name="best", run=run, config=config, state=best)
        if args.output_dir and (epoch % args.save_freq == 0 or epoch + 1 == args.epochs):
            save_model(args=args, model_without_ddp=model_without_ddp, optimizer=optimizer,
                       loss_scaler=loss_scaler, epoch=epoch, run=run, config=config, state=best)
        if log_writer is not None:
            for key in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f'val/{key}', test_stats[key], epoch)
            log_writer.flush()
    runsetup.print_weights_fingerprint(model_without_ddp)
    if args.output_dir and is_main_process():  # the run's row in `benchmark.py compare`
        atomic_write_json(os.path.join(args.output_dir, FINETUNE_RESULT), {
            "kind": kind,
            "model": args.model, "finetune": os.path.abspath(args.finetune) if args.finetune else "",
            "train_subset": args.train_subset, "train_images": len(loader_train.dataset),
            "epochs": args.epochs, "max_accuracy": max_accuracy})
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if log_writer is not None:
        log_writer.close()
    return {"max_accuracy": max_accuracy}


def main(args: argparse.Namespace) -> dict:
    run = runsetup.setup_run(args, __file__)
    device = run.device
    downstream = Downstream(args)

    _, sampler_train, loader_train, loader_val = build_loaders(args, build_finetune_transform, downstream)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        print("Mixup is activated!")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)

    model = build_downstream_model(args, downstream, drop_path_rate=args.drop_path)
    model.to(device)
    model_without_ddp = model
    runsetup.log_details(args, "model.txt", f"Model = {model_without_ddp}", f"{args.model} structure")
    print(f'number of params (M): {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1.e6:.2f}')

    runsetup.set_lr_from_blr(args, downstream.resumed.args if downstream.resumed is not None else None)

    model = runsetup.wrap_model(model, run)

    param_groups = param_groups_layer_decay(model_without_ddp, args.weight_decay,
                                            no_weight_decay=model_without_ddp.no_weight_decay(),
                                            layer_decay=args.layer_decay)
    optimizer = build_optimizer(args, param_groups, device)
    loss_scaler = misc.LossScaler(enabled=run.amp == "fp16")

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is handled with mixup label transform
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print(f"criterion = {criterion}")

    start_epoch = args.start_epoch
    if downstream.resumed is not None:
        start_epoch = resume_states(downstream.resumed, model_without_ddp, None if args.eval else optimizer,
                                    loss_scaler) or start_epoch

    if args.eval:
        test_stats = evaluate(loader_val, model, device, run.amp)
        print(f"Accuracy of the network on the {test_stats['count']} test images: {test_stats['acc1']:.1f}%")
        return test_stats
    return run_training(args, model, model_without_ddp, optimizer, criterion, loss_scaler, loader_train,
                        sampler_train, loader_val, run, downstream, start_epoch, mixup_fn=mixup_fn,
                        max_norm=args.clip_grad)


def cli(argv: list[str] | None = None):
    return runsetup.run_cli(get_args_parser(), check_args, main, argv)


if __name__ == '__main__':
    cli()
