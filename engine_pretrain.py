"""One epoch of MAE pretraining."""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from typing import Iterable

import torch

import util.misc as misc
from run.files import append_auxiliary
from run.setup import Runtime
from util.lr_sched import adjust_learning_rate
from util.misc import (NonFiniteLossError, UserError, all_reduce_mean, autocast, epoch_progress, get_world_size,
                       is_dist_avail_and_initialized, is_main_process, mark_step_begin)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The MaskedAutoencoderViT inside DDP and torch.compile (run.setup.wrap_model)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def normalise_by_global_weight(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Turns sum(w * e) / sum_local(w) into sum(w * e) / mean_over_ranks(sum(w)), ``weights`` the
    loss's own (models_mae.loss_weights, whose sum forward_loss divides by).

    DDP averages gradients over ranks, so with this every rank's share is weighted by how much of
    the global batch's loss weight it holds, and N ranks compute the gradient of one process with
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
    if all_ranks_finite(loss, is_dist_avail_and_initialized()):
        return False
    skipped.append(step)
    print(f"WARNING: non-finite loss at epoch {epoch}, step {step}: step skipped "
          f"({len(skipped)}/{args.skip_nonfinite} this epoch)", force=True)
    if len(skipped) > args.skip_nonfinite:
        raise NonFiniteLossError(
            f"more than --skip_nonfinite {args.skip_nonfinite} non-finite losses in epoch {epoch} "
            f"(steps {skipped}); stopping. The last checkpoint in {args.output_dir} is intact.")
    return True


MIN_BAD_SAMPLES_TO_STOP = 10  # a handful of unreadable files in a small set never stops a run
SHOWN_BAD_SAMPLES = 3  # examples printed at the end of an epoch; bad_samples.txt lists them all


def report_bad_samples(bad_samples: list[str], epoch: int, output_dir: str, samples_per_epoch: int = 0) -> int:
    """--skip_bad_samples: the unreadable samples of every rank, counted on the screen (with a few
    examples) and listed in bad_samples.txt; returns how many."""
    all_bad = gather_lists(bad_samples)
    if all_bad:
        listed = (f"; all in {os.path.join(output_dir, 'bad_samples.txt')}" if output_dir else "")
        share = (f" of {samples_per_epoch:,} ({100 * len(all_bad) / samples_per_epoch:.2f} %)"
                 if samples_per_epoch else "")
        examples = "\n  ".join(m.splitlines()[-1] if m else m for m in all_bad[:SHOWN_BAD_SAMPLES])
        print(f"{len(all_bad):,} unreadable samples{share} skipped in epoch {epoch}{listed}; e.g.\n  {examples}")
        if output_dir and is_main_process():  # an auxiliary output: a failed write warns once (run.files)
            append_auxiliary(os.path.join(output_dir, "bad_samples.txt"),
                             [f"epoch {epoch}\t{m.splitlines()[-1] if m else m}\n" for m in all_bad])
    return len(all_bad)


def bad_sample_limit(max_bad_percent: float, samples_per_epoch: int) -> int:
    """How many unreadable samples an epoch of ``samples_per_epoch`` may skip (--max_bad_percent of
    them, at least MIN_BAD_SAMPLES_TO_STOP)."""
    if max_bad_percent >= 100:
        return samples_per_epoch
    return max(math.ceil(max_bad_percent / 100 * samples_per_epoch), MIN_BAD_SAMPLES_TO_STOP)


def stop_if_too_many_bad(counts: "EpochCounts", limit: int, samples_per_epoch: int, epoch: int, args) -> None:
    """--skip_bad_samples: stops the run once this rank skipped more than ``limit`` samples of its
    epoch (a wrong count or a broken file system would otherwise train on nothing)."""
    if len(counts.bad_samples) <= limit:
        return
    first = counts.bad_samples[0].splitlines()[-1] if counts.bad_samples[0] else ""
    raise UserError(f"{len(counts.bad_samples):,} unreadable samples skipped so far in epoch {epoch}, more than "
                    f"--max_bad_percent {args.max_bad_percent:g} of the epoch's {samples_per_epoch:,} samples allow "
                    f"({limit:,}), e.g. {first}. Fix the data (python tools/check_dataset.py lists what is wrong), or "
                    f"raise --max_bad_percent")


def gather_lists(items: list) -> list:
    """Concatenates a list from every rank (at epoch end only)."""
    if not is_dist_avail_and_initialized():
        return items
    out: list = [None] * get_world_size()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


class EpochCounts:
    """What an epoch counts besides its meters: images trained on, the unreadable samples skipped
    (--skip_bad_samples), the non-finite steps skipped (--skip_nonfinite) and the samples whose
    segment hides nothing (a device tensor, read once at the end)."""

    def __init__(self, device: torch.device):
        self.start = time.time()
        self.images = 0
        self.bad_samples: list[str] = []
        self.skipped_steps: list[int] = []
        self.empty_segments = torch.zeros((), dtype=torch.int64, device=device)


def batch_to_device(batch: tuple, counts: EpochCounts, run: Runtime) -> tuple | None:
    """(images, segment masks or None) on the device; None for a batch of unreadable samples only."""
    samples, seg_mask, bad = batch
    counts.bad_samples += bad
    if samples is None:
        if run.distributed:  # the other ranks would wait for this one's gradients forever
            raise UserError(f"every sample of a batch was unreadable ({bad[:3]}...); fix the data")
        return None
    seg_mask = seg_mask.to(run.device, non_blocking=True) if seg_mask is not None else None
    return samples.to(run.device, non_blocking=True), seg_mask


def mae_step(model: torch.nn.Module, samples: torch.Tensor, seg_mask: torch.Tensor | None, optimizer,
             loss_scaler: misc.LossScaler, run: Runtime, args, update: bool, where: tuple) -> tuple | None:
    """Forward, loss, backward; the optimizer steps when ``update`` (the last of --accum_iter steps).
    Returns (loss, the per-patch hidden fraction), or None for a step --skip_nonfinite skipped.
    where: (epoch, step, EpochCounts)."""
    # skip DDP's gradient all-reduce on accumulation steps
    sync_ctx = model.no_sync() if (run.distributed and not update) else nullcontext()
    mark_step_begin(run.compile_mode)
    with sync_ctx:
        with autocast(run.device, run.amp):
            loss, _, mask = model(samples, mask_ratio=args.mask_ratio, seg_mask=seg_mask)
        if run.distributed:
            loss = normalise_by_global_weight(loss, unwrapped(model).loss_weights(mask, seg_mask))
        epoch, step, counts = where
        if args.skip_nonfinite and skip_nonfinite_step(loss, args, epoch, step, counts.skipped_steps):
            optimizer.zero_grad(set_to_none=True)
            return None
        loss_scaler(loss / args.accum_iter, optimizer, parameters=model.parameters(), update_grad=update)
    if update:
        optimizer.zero_grad(set_to_none=True)
    return loss, mask


def record_step(metric_logger: misc.MetricLogger, monitor, method, loss: torch.Tensor, mask: torch.Tensor,
                batch: tuple, counts: EpochCounts, lr: float) -> None:
    """The step's numbers, all kept on the device (no host sync)."""
    samples, seg_mask = batch
    monitor.record(loss)
    metric_logger.update(hidden=mask.detach().float().mean())
    if seg_mask is not None:
        counts.empty_segments += (seg_mask.flatten(1).sum(dim=1) == 0).sum()
        metric_logger.update(**method.batch_stats(mask.detach(), seg_mask))
    counts.images += samples.shape[0]
    metric_logger.update(lr=lr)


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    run: Runtime, epoch: int, loss_scaler: misc.LossScaler,
                    log_writer=None, args=None, log_images=None) -> dict:
    """log_images(x): called with --log_freq at its steps (x: the step in 1/1000 epochs), to
    write the reconstruction grid to TensorBoard."""
    model.train(True)
    metric_logger, monitor, iterator = epoch_progress(
        data_loader, epoch, run.device, args, log_writer,
        hint="Lower --blr, raise --warmup_epochs, or try --amp bf16/none.")
    method, counts, steps_per_epoch = unwrapped(model).method, EpochCounts(run.device), len(data_loader)
    samples_per_epoch = steps_per_epoch * args.batch_size  # this rank's
    bad_limit = bad_sample_limit(getattr(args, "max_bad_percent", 100.0), samples_per_epoch)
    optimizer.zero_grad(set_to_none=True)
    if log_writer is not None:
        print(f'log_dir: {log_writer.log_dir}')

    for step, batch in enumerate(iterator):
        if step % args.accum_iter == 0:  # per-iteration (instead of per-epoch) lr schedule
            adjust_learning_rate(optimizer, step / steps_per_epoch + epoch, args)
        batch = batch_to_device(batch, counts, run)
        if args.skip_bad_samples:
            stop_if_too_many_bad(counts, bad_limit, samples_per_epoch, epoch, args)
        if batch is None:
            continue
        update = (step + 1) % args.accum_iter == 0
        result = mae_step(model, *batch, optimizer, loss_scaler, run, args, update, (epoch, step, counts))
        if result is None:
            continue
        record_step(metric_logger, monitor, method, *result, batch, counts, optimizer.param_groups[0]["lr"])
        if monitor.due(step):  # --log_freq: loss, lr and the reconstructions to TensorBoard
            monitor(step, to_tensorboard=True)
            if log_images is not None and log_writer is not None:
                log_images(monitor.epoch_1000x(step))
    return epoch_stats(metric_logger, epoch, counts, args, method.needs_segment, samples_per_epoch)


def epoch_stats(metric_logger: misc.MetricLogger, epoch: int, counts: EpochCounts, args, segments: bool,
                samples_per_epoch: int = 0) -> dict:
    """The epoch's log row: the meters averaged over ranks, speed, and the samples and steps that
    were counted or skipped (each read once, here)."""
    epoch_time = time.time() - counts.start
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["img_per_sec"] = counts.images * get_world_size() / max(epoch_time, 1e-9)
    stats["epoch_time"] = epoch_time
    if segments:
        # samples whose chosen segment hides nothing (they add no loss)
        stats["empty_segments"] = int(round(all_reduce_mean(float(counts.empty_segments.item())) * get_world_size()))
    if args.skip_bad_samples:
        stats["bad_samples"] = report_bad_samples(counts.bad_samples, epoch, args.output_dir,
                                                  samples_per_epoch * get_world_size())
    if args.skip_nonfinite:
        stats["skipped_nonfinite_steps"] = len(counts.skipped_steps)
    if not math.isfinite(stats.get("loss", 0.0)):
        raise NonFiniteLossError(f"average loss of epoch {epoch} is not finite; stopping.")
    return stats
