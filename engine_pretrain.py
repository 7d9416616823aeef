"""One epoch of MAE pretraining."""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from typing import Iterable

import torch

import util.lr_sched as lr_sched
import util.misc as misc
from util.distributed import all_reduce_mean, get_world_size, is_dist_avail_and_initialized, is_main_process
from util.errors import UserError
from util.masking import get_method, uses_segments
from util.speed import mark_step_begin


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


def all_ranks_finite(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on every rank (one host sync; ranks must skip a step together)."""
    bad = (~torch.isfinite(loss.detach())).float()
    if distributed:
        torch.distributed.all_reduce(bad)
    return bad.item() == 0


def skip_nonfinite_step(loss: torch.Tensor, args, epoch: int, step: int, skipped: list[int]) -> bool:
    """--skip_nonfinite: True (and the step is recorded) when the loss is not finite on some rank;
    more such steps in an epoch than allowed stop the run, the last checkpoint untouched."""
    if all_ranks_finite(loss, args.distributed):
        return False
    skipped.append(step)
    print(f"WARNING: non-finite loss at epoch {epoch}, step {step}: step skipped "
          f"({len(skipped)}/{args.skip_nonfinite} this epoch)", force=True)
    if len(skipped) > args.skip_nonfinite:
        raise misc.NonFiniteLossError(
            f"more than --skip_nonfinite {args.skip_nonfinite} non-finite losses in epoch {epoch} "
            f"(steps {skipped}); stopping. The last checkpoint in {args.output_dir} is intact.")
    return True


def report_bad_samples(bad_samples: list[str], epoch: int, output_dir: str) -> int:
    """--skip_bad_samples: the unreadable samples of every rank, printed and appended to
    bad_samples.txt; returns how many."""
    all_bad = gather_lists(bad_samples)
    if all_bad:
        print(f"{len(all_bad)} unreadable samples skipped in epoch {epoch}:\n  " + "\n  ".join(all_bad))
        if output_dir and is_main_process():
            with open(os.path.join(output_dir, "bad_samples.txt"), "a") as f:
                f.writelines(f"epoch {epoch}\t{m.splitlines()[-1] if m else m}\n" for m in all_bad)
    return len(all_bad)


def gather_lists(items: list) -> list:
    """Concatenates a list from every rank (at epoch end only)."""
    if not is_dist_avail_and_initialized():
        return items
    out: list = [None] * get_world_size()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler: misc.LossScaler,
                    log_writer=None, args=None, log_images=None) -> dict:
    """log_images(x): called with --log_freq at its steps (x: the step in 1/1000 epochs), to
    write the reconstruction grid to TensorBoard."""
    model.train(True)
    metric_logger, monitor, iterator = misc.epoch_progress(
        data_loader, epoch, device, args, log_writer,
        hint="Lower --blr, raise --warmup_epochs, or try --amp bf16/none.")
    accum_iter = args.accum_iter
    steps_per_epoch = len(data_loader)
    method = get_method(args.mask_method)
    empty_segments = torch.zeros((), dtype=torch.int64, device=device)  # read once, at the end

    optimizer.zero_grad(set_to_none=True)
    if log_writer is not None:
        print(f'log_dir: {log_writer.log_dir}')

    start = time.time()
    images_seen = 0
    bad_samples: list[str] = []  # unreadable samples skipped with --skip_bad_samples
    skipped_steps: list[int] = []  # non-finite steps skipped with --skip_nonfinite
    for data_iter_step, batch in enumerate(iterator):
        # per-iteration (instead of per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / steps_per_epoch + epoch, args)

        samples, seg_mask, bad = batch
        bad_samples += bad
        if samples is None:
            if args.distributed:  # the other ranks would wait for this one's gradients forever
                raise UserError(f"every sample of a batch was unreadable ({bad[:3]}...); fix the data")
            continue
        samples = samples.to(device, non_blocking=True)
        seg_mask = seg_mask.to(device, non_blocking=True) if seg_mask is not None else None
        update = (data_iter_step + 1) % accum_iter == 0
        # skip DDP's gradient all-reduce on accumulation steps
        sync_ctx = model.no_sync() if (args.distributed and not update) else nullcontext()
        mark_step_begin(args.compile_mode if args.compile else None)
        with sync_ctx:
            with misc.autocast(device, args.amp):
                loss, _, weights = model(samples, mask_ratio=args.mask_ratio, seg_mask=seg_mask)
            if args.distributed and seg_mask is not None:
                loss = normalise_by_global_weight(loss, weights)
            if args.skip_nonfinite and skip_nonfinite_step(loss, args, epoch, data_iter_step, skipped_steps):
                optimizer.zero_grad(set_to_none=True)
                continue
            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        monitor.record(loss)
        metric_logger.update(hidden=weights.detach().float().mean())  # on the device: no sync
        if seg_mask is not None:
            empty_segments += (seg_mask.flatten(1).sum(dim=1) == 0).sum()
            metric_logger.update(**method.batch_stats(weights.detach(), seg_mask))
        images_seen += samples.shape[0]
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        if monitor.due(data_iter_step):  # --log_freq: loss, lr and the reconstructions to TensorBoard
            monitor(data_iter_step, to_tensorboard=True)
            if log_images is not None and log_writer is not None:
                log_images(monitor.epoch_1000x(data_iter_step))

    return epoch_stats(metric_logger, epoch, time.time() - start, images_seen, empty_segments, bad_samples,
                       skipped_steps, args)


def epoch_stats(metric_logger: misc.MetricLogger, epoch: int, epoch_time: float, images_seen: int,
                empty_segments: torch.Tensor, bad_samples: list[str], skipped_steps: list[int], args) -> dict:
    """The epoch's log row: the meters averaged over ranks, speed, and the samples and steps that
    were counted or skipped (each read once, here)."""
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["img_per_sec"] = images_seen * get_world_size() / max(epoch_time, 1e-9)
    stats["epoch_time"] = epoch_time
    if uses_segments(args.mask_method):
        # samples whose chosen segment hides nothing (they add no loss)
        stats["empty_segments"] = int(round(all_reduce_mean(float(empty_segments.item())) * get_world_size()))
    if args.skip_bad_samples:
        stats["bad_samples"] = report_bad_samples(bad_samples, epoch, args.output_dir)
    if args.skip_nonfinite:
        stats["skipped_nonfinite_steps"] = len(skipped_steps)
    if not math.isfinite(stats.get("loss", 0.0)):
        raise misc.NonFiniteLossError(f"average loss of epoch {epoch} is not finite; stopping.")
    return stats
