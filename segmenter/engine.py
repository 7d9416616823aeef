"""One Segmenter training epoch (polynomial lr per step) and the sliding-window evaluation."""
from __future__ import annotations

import time

import torch

from run.setup import Runtime
from segmenter.data import ADE20K
from segmenter.inference import predict
from segmenter.metrics import ConfusionMatrix
from util.misc import autocast, epoch_progress, get_rank, get_world_size


def poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, args) -> float:
    lr = (args.lr - args.min_lr) * (1 - step / total_steps) ** 0.9 + args.min_lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def collate_eval(batch):
    return batch  # variable image sizes: a list of (image, label)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ADE20K, run: Runtime, args) -> dict:
    """Single-scale sliding-window evaluation; each rank scores its share, matrices are summed."""
    model.eval()
    device = run.device
    cm = ConfusionMatrix(args.n_cls, device)
    indices = list(range(get_rank(), len(dataset), get_world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=args.num_workers, collate_fn=collate_eval)
    start = time.time()
    for [(img, label)] in loader:
        img, label = img.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with autocast(device, run.amp):
            pred = predict(model, img, label.shape[-2:], args.n_cls, args.window_size, args.window_stride)
        cm.update(pred, label)
    cm.reduce()
    metrics = cm.compute()
    print(f"* mIoU {metrics['mIoU']:.2f}  pixel acc {metrics['pixel_accuracy']:.2f}  "
          f"mean class acc {metrics['mean_class_accuracy']:.2f}  ({len(dataset)} images, "
          f"{time.time() - start:.0f}s)")
    return metrics


def train_one_epoch(model, loader, optimizer, criterion, loss_scaler, run: Runtime, epoch, step, total_steps,
                    args, log_writer=None) -> tuple[dict, int]:
    model.train()
    device = run.device
    metric_logger, monitor, iterator = epoch_progress(loader, epoch, device, args, log_writer,
                                                           hint="Lower --lr.")
    for img, label in iterator:
        lr = poly_lr(optimizer, step, total_steps, args)
        img, label = img.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with autocast(device, run.amp):
            logits = model(img)
        loss = criterion(logits.float(), label)
        loss_scaler(loss, optimizer, parameters=model.parameters())
        optimizer.zero_grad(set_to_none=True)
        monitor.record(loss)
        metric_logger.update(lr=lr)
        step += 1
    metric_logger.synchronize_between_processes()
    return {k: m.global_avg for k, m in metric_logger.meters.items()}, step
