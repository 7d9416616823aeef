"""One epoch of supervised finetuning / linear probing, and top-1 / top-5 evaluation."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch
from timm.data import Mixup

import util.misc as misc
from run.setup import Runtime
from util.lr_sched import adjust_learning_rate
from util.misc import autocast, epoch_progress, is_dist_avail_and_initialized, mark_step_begin


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, run: Runtime, epoch: int,
                    loss_scaler: misc.LossScaler, max_norm: float | None = None,
                    mixup_fn: Mixup | None = None, log_writer=None, args=None) -> dict:
    model.train(True)
    device = run.device
    metric_logger, monitor, iterator = epoch_progress(data_loader, epoch, device, args, log_writer,
                                                           hint="Lower --blr or set --clip_grad.")
    accum_iter = args.accum_iter
    steps_per_epoch = len(data_loader)

    optimizer.zero_grad(set_to_none=True)
    for data_iter_step, (samples, targets) in enumerate(iterator):
        if data_iter_step % accum_iter == 0:
            adjust_learning_rate(optimizer, data_iter_step / steps_per_epoch + epoch, args)

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (data_iter_step + 1) % accum_iter == 0
        sync_ctx = model.no_sync() if (run.distributed and not update) else nullcontext()
        mark_step_begin(run.compile_mode)
        with sync_ctx:
            with autocast(device, run.amp):
                outputs = model(samples)
                loss = criterion(outputs.float(), targets)
            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm,
                        parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        monitor.record(loss)
        metric_logger.update(lr=max(group["lr"] for group in optimizer.param_groups))

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device, amp: str = "none",
             print_freq: int = 10) -> dict:
    """Top-1 / top-5 accuracy (percent) and cross-entropy, summed over every rank's share."""
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    metric_logger = misc.MetricLogger(delimiter="  ")
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        topk = output.topk(k, dim=1).indices
        correct = topk.eq(target.unsqueeze(1))
        totals += torch.stack([criterion(output, target).double(), correct[:, :1].sum().double(),
                               correct.sum().double(), torch.tensor(float(len(target)), device=device,
                                                                    dtype=torch.float64)])
    if is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    stats = {"loss": loss / max(count, 1), "acc1": 100.0 * top1 / max(count, 1),
             "acc5": 100.0 * top5 / max(count, 1), "count": int(count)}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({stats['count']} images)")
    return stats
