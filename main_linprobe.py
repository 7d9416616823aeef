"""Linear probing: a frozen pretrained encoder (any mask method, or an official MAE checkpoint),
BatchNorm without affine parameters, and a linear head trained with LARS, as the MAE reference.

    python main_linprobe.py --finetune pretrain/checkpoint-799.pth --data_path DIR --model vit_base_patch16
"""
from __future__ import annotations

import argparse

import torch
from timm.layers import trunc_normal_

import run.setup as runsetup
import util.misc as misc
from engine_finetune import evaluate
from inputs.classification import build_linprobe_transform
from inputs.transforms import add_recipe_args
from main_finetune import Downstream, build_downstream_model, build_loaders, check_downstream_args, run_training
from mask_methods import MASK_METHODS
from run.checkpoint import resume_states
from run.flags import add_downstream_args, add_training_args, check_optimizer_args
from run.setup import build_optimizer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE linear probing for image classification', add_help=False)
    add_training_args(parser)
    add_recipe_args(parser)
    parser.set_defaults(batch_size=512, epochs=90, weight_decay=0.0, blr=0.1, min_lr=0.0, warmup_epochs=10, opt="lars")
    parser.add_argument('--model', default='vit_large_patch16', type=str, metavar='MODEL',
                        help='Name of model to train')
    add_downstream_args(parser, MASK_METHODS)
    parser.set_defaults(global_pool=False)
    return parser


def linear_probe_head(model: torch.nn.Module) -> None:
    """head := BatchNorm1d(affine=False) -> Linear; everything but the head is frozen."""
    trunc_normal_(model.head.weight, std=0.01)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6),
                                     model.head)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")


def main(args: argparse.Namespace) -> dict:
    run = runsetup.setup_run(args, __file__)
    device = run.device
    downstream = Downstream(args, script="main_linprobe.py")

    _, sampler_train, loader_train, loader_val = build_loaders(args, build_linprobe_transform, downstream)
    model = build_downstream_model(args, downstream)
    linear_probe_head(model)
    model.to(device)
    model_without_ddp = model
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runsetup.log_details(args, "model.txt", f"Model = {model_without_ddp}", f"{args.model} structure")
    print(f"number of trainable params (M): {n_trainable / 1.e6:.4f}")

    runsetup.set_lr_from_blr(args, downstream.resumed.args if downstream.resumed is not None else None)

    model = runsetup.wrap_model(model, run)

    head = [{"params": list(model_without_ddp.head.parameters()), "weight_decay": args.weight_decay}]
    optimizer = build_optimizer(args, head, device)
    runsetup.log_details(args, "optimizer.txt", str(optimizer), "optimizer")
    loss_scaler = misc.LossScaler(enabled=run.amp == "fp16")
    criterion = torch.nn.CrossEntropyLoss()

    start_epoch = args.start_epoch
    if downstream.resumed is not None:
        start_epoch = resume_states(downstream.resumed, model_without_ddp, None if args.eval else optimizer,
                                    loss_scaler) or start_epoch
    if args.eval:
        return evaluate(loader_val, model, device, run.amp)
    return run_training(args, model, model_without_ddp, optimizer, criterion, loss_scaler, loader_train,
                        sampler_train, loader_val, run, downstream, start_epoch, kind="linprobe")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    check_optimizer_args(args, parser, ("lars", "adamw"), default_betas=(0.9, 0.999))
    check_downstream_args(args, parser)


def cli(argv: list[str] | None = None):
    return runsetup.run_cli(get_args_parser(), check_args, main, argv)


if __name__ == '__main__':
    cli()
