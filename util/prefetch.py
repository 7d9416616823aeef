"""Batches moved to the training device ahead of the step (``--data_backend gpu``)."""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext

import torch


class DevicePrefetcher:
    """Iterates a pretraining loader with each batch already on the device: a background thread
    moves batch k+1 (for ``--data_backend gpu`` that is decode, crop and resize) on its own CUDA
    stream while the training step runs on batch k. Same batches, same order as the loader.

    Yields what collate_pretrain gives, with the images and masks on ``device``."""

    def __init__(self, loader, device: torch.device, depth: int = 2):
        self.loader, self.device, self.depth = loader, torch.device(device), depth

    def __len__(self) -> int:
        return len(self.loader)

    def _move(self, batch, stream):
        imgs, masks, bad = batch
        if imgs is None:
            return batch, None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            imgs = imgs.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True) if masks is not None else None
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        return (imgs, masks, bad), event

    def __iter__(self):
        done = object()
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        device_index = self.device.index if self.device.index is not None else (torch.cuda.current_device() if cuda else None)

        def put(item) -> bool:
            """Waits for room in the queue unless the consumer has stopped."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                if cuda:
                    torch.cuda.set_device(device_index)
                stream = torch.cuda.Stream(device_index) if cuda else None
                for batch in self.loader:
                    if not put(self._move(batch, stream)):
                        return
                put(done)
            except BaseException as e:  # re-raised in the training loop
                put(e)

        thread = threading.Thread(target=produce, name="device-prefetcher", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:  # the step's stream waits for the copy; the allocator knows
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in batch[:2]:
                        if t is not None:
                            t.record_stream(current)
                yield batch
        finally:
            stop.set()
