"""One epoch of MAE pretraining."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Iterable

import torch

import util.lr_sched as lr_sched
import util.misc as misc


def normalise_by_global_weight(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Turns sum(w * mse) / sum_local(w) into sum(w * mse) / mean_over_ranks(sum(w)).

    DDP averages gradients over ranks, so with this every rank's share is weighted by how much of
    the global batch's hidden area it holds, and N ranks compute the gradient of one process with
    the whole batch. One small all-reduce on device; no host sync."""
    local = weights.detach().sum().float()
    mean = local.clone()
    torch.distributed.all_reduce(mean)
    mean = mean / torch.distributed.get_world_size()
    return loss * (local / mean.clamp_min(1e-12))


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler: misc.LossScaler,
                    log_writer=None, args=None) -> dict:
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    accum_iter = args.accum_iter
    steps_per_epoch = len(data_loader)

    monitor = misc.LossMonitor(metric_logger, device, epoch, steps_per_epoch, args, log_writer,
                               hint="Lower --blr, raise --warmup_epochs, or try --amp bf16/none.")
    empty_segments = torch.zeros((), dtype=torch.int64, device=device)  # read once, at the end

    optimizer.zero_grad(set_to_none=True)
    if log_writer is not None:
        print(f'log_dir: {log_writer.log_dir}')

    start = time.time()
    images_seen = 0
    iterator = metric_logger.log_every(data_loader, args.print_freq, header, batch_size=args.batch_size,
                                       on_print=monitor)
    for data_iter_step, batch in enumerate(iterator):
        # per-iteration (instead of per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / steps_per_epoch + epoch, args)

        samples = batch[0].to(device, non_blocking=True)
        seg_mask = batch[1].to(device, non_blocking=True) if len(batch) == 3 else None
        update = (data_iter_step + 1) % accum_iter == 0
        # skip DDP's gradient all-reduce on accumulation steps
        sync_ctx = model.no_sync() if (args.distributed and not update) else nullcontext()
        with sync_ctx:
            with misc.autocast(device, args.amp):
                loss, _, weights = model(samples, mask_ratio=args.mask_ratio, seg_mask=seg_mask)
            if args.distributed and seg_mask is not None:
                loss = normalise_by_global_weight(loss, weights)
            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        monitor.record(loss.detach())
        if seg_mask is not None:
            empty_segments += (weights.sum(dim=1) == 0).sum()
        images_seen += samples.shape[0]
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])

    epoch_time = time.time() - start
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["img_per_sec"] = images_seen * misc.get_world_size() / max(epoch_time, 1e-9)
    stats["epoch_time"] = epoch_time
    if args.mask_method != "patches":
        # samples whose chosen segment hides nothing (they add no loss)
        stats["empty_segments"] = int(round(misc.all_reduce_mean(float(empty_segments.item())) * misc.get_world_size()))
    if not math.isfinite(stats.get("loss", 0.0)):
        raise misc.NonFiniteLossError(f"average loss of epoch {epoch} is not finite; stopping.")
    return stats
