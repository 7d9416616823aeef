"""One epoch of MAE pretraining."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Iterable

import torch

import util.lr_sched as lr_sched
import util.misc as misc
from util.errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops before anything is saved."""


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

    # Device-side accumulators: read only when printing, so the loop never waits on the GPU.
    nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)
    empty_segments = torch.zeros((), dtype=torch.int64, device=device)

    def check_and_log(step: int) -> None:
        """At print time only: every rank learns whether any rank saw a non-finite loss (so all stop
        together), and rank 0 logs the loss averaged over ranks."""
        state = torch.stack([nonfinite_steps.double(), metric_logger.loss.deque[-1].double()])
        if args.distributed:
            torch.distributed.all_reduce(state)
        bad, loss_sum = state.tolist()
        if bad > 0:
            raise NonFiniteLossError(
                f"loss is not finite (NaN or inf) at epoch {epoch}, step <= {step}; stopping. Nothing was "
                f"saved for this epoch, the last checkpoint in {args.output_dir or 'output_dir'} is intact. "
                f"Lower --blr, raise --warmup_epochs, or try --amp bf16/none.")
        if log_writer is not None:
            # x-axis in units of 1/1000 epoch, so that curves of different batch sizes line up
            epoch_1000x = int((step / steps_per_epoch + epoch) * 1000)
            log_writer.add_scalar('train_loss', loss_sum / misc.get_world_size(), epoch_1000x)
            log_writer.add_scalar('lr', metric_logger.lr.value, epoch_1000x)

    optimizer.zero_grad(set_to_none=True)
    if log_writer is not None:
        print(f'log_dir: {log_writer.log_dir}')

    start = time.time()
    images_seen = 0
    iterator = metric_logger.log_every(data_loader, args.print_freq, header, batch_size=args.batch_size,
                                       on_print=check_and_log)
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

        loss = loss.detach()
        nonfinite_steps += (~torch.isfinite(loss)).long()
        if seg_mask is not None:
            empty_segments += (weights.sum(dim=1) == 0).sum()
        images_seen += samples.shape[0]
        metric_logger.update(loss=loss)
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
        raise NonFiniteLossError(f"average loss of epoch {epoch} is not finite; stopping.")
    return stats
