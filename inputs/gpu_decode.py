"""The GPU half of the data path (``--data_backend gpu``): a batch that the loader workers left
encoded (inputs/pretrain.DeferredPretrainTransform: the file's bytes, the crop box and flip already
drawn) is decoded (nvjpeg, one batched call), cropped, resized, flipped and normalised on the
training device when it is moved there (``PendingBatch.to``); and ``DevicePrefetcher`` moves batch
k+1 on its own CUDA stream while the step runs on batch k. Same boxes, same flips, same masks as the
CPU path; image pixels differ only by the resize implementation (torch's antialiased bicubic vs
Pillow's)."""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from util.misc import UserError


class PendingImage:
    """One sample's image on its way to the training device: the encoded JPEG file (or, for other
    formats, the pixels decoded in the worker, uint8 (3, h, w)), its crop box and flip, and the
    output size and normalisation of the transform that drew them."""

    def __init__(self, data: torch.Tensor, encoded: bool, box: tuple[int, int, int, int], flip: bool,
                 size: tuple[int, int], mean, std, path: str = ""):
        self.data, self.encoded, self.box, self.flip = data, encoded, box, flip
        self.size, self.mean, self.std, self.path = size, tuple(mean), tuple(std), path

    @classmethod
    def of(cls, img, box: tuple[int, int, int, int], flip: bool, size: tuple[int, int], mean, std) -> "PendingImage":
        """From a inputs.images.EncodedImage: a JPEG stays encoded; other formats, which nvjpeg does
        not read, are decoded here (in the loader worker)."""
        if img.is_jpeg:
            return cls(torch.frombuffer(bytearray(img.data), dtype=torch.uint8), True, box, flip, size, mean, std, img.path)
        pixels = torch.from_numpy(np.asarray(img.decode(), dtype=np.uint8).copy()).permute(2, 0, 1)
        return cls(pixels, False, box, flip, size, mean, std, img.path)


class PendingBatch:
    """A batch of PendingImage. ``.to(device)`` decodes it there (nvjpeg on a GPU, in one batched
    call), crops, resizes (bicubic, antialiased), flips and normalises each image, and returns the
    (N, 3, H, W) float tensor the model takes, so a training loop's ``samples.to(device)`` works
    unchanged for either data path."""

    def __init__(self, items: list[PendingImage]):
        self.items, self.size = items, items[0].size
        self.mean = torch.tensor(items[0].mean).view(1, 3, 1, 1)
        self.std = torch.tensor(items[0].std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "PendingBatch":
        for item in self.items:
            item.data = item.data.pin_memory()
        return self

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        jpegs = [i for i, item in enumerate(self.items) if item.encoded]
        pixels: dict[int, torch.Tensor] = {}
        if jpegs:
            pixels.update(zip(jpegs, self._decode([self.items[i] for i in jpegs], device)))
        out = torch.empty(len(self.items), 3, *self.size, device=device)
        for i, item in enumerate(self.items):
            img = pixels[i] if i in pixels else item.data.to(device, non_blocking=non_blocking)
            top, left, h, w = item.box
            crop = img[None, :, top:top + h, left:left + w].float()
            crop = F.interpolate(crop, size=self.size, mode="bicubic", antialias=True, align_corners=False)
            if item.flip:
                crop = crop.flip(-1)
            out[i] = crop[0]
        # uint8 rounding and range as Pillow's resize, then ToTensor + Normalize
        out = out.clamp_(0, 255).round_().div_(255)
        return (out - self.mean.to(device)) / self.std.to(device)

    @staticmethod
    def _decode(items: list[PendingImage], device: torch.device) -> list[torch.Tensor]:
        """One batched decode; if the GPU decoder refuses the batch (a JPEG variant it does not
        read), each file is decoded on the CPU instead, and a broken one is named."""
        try:  # torchvision 0.29 deprecates its decoders (for TorchCodec, which needs FFmpeg)
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise UserError("--data_backend gpu needs torchvision.io.decode_jpeg, which this torchvision no "
                            "longer has: use --data_backend cpu") from None
        try:
            return decode_jpeg([item.data for item in items], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # one by one on the CPU, below
        out = []
        for item in items:
            try:
                out.append(decode_jpeg(item.data, mode=ImageReadMode.RGB).to(device))
            except RuntimeError as e:
                raise UserError(f"cannot decode image {item.path}: {e}. Replace or delete the file "
                                f"(python tools/check_dataset.py finds every such file).") from None
        return out


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
