"""Image files: the list of a dataset's images (``ImageList``, shared by forked loader workers
without copying), reading one decoded to RGB as the MAE reference reads them (Pillow, EXIF
orientation not applied, 16-bit and 32-bit float greyscale scaled rather than clipped) or kept encoded for the GPU
decoder, and a read deadline, so that a hung file system stops a run with the file named.

An ``ImageList`` holds the paths in one byte buffer and the labels in one numpy array, not a list
of tuples: a data-loader worker that reads a Python object writes its reference count, so with
1.28M (path, label) tuples every forked worker ends up copying most of them (about 250 bytes per
image per worker); three numpy arrays are three objects."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from sam.geometry import EXIF_ORIENTATION_TAG, IMAGE_ERRORS, image_error_message
from util.misc import UserError


class DataError(UserError):
    """A dataset problem the user must fix (wrong path, missing files); the message says how."""


class ImageList:
    """(path, label) per image, stored as a NUL-separated UTF-8 buffer of paths relative to
    ``root``, their start offsets, and the labels: ``images[i]`` is (absolute path, label) as in
    torchvision's ``samples``; ``rel(i)`` is the relative path; ``rels()`` decodes them all at once."""

    def __init__(self, root: str, rels: Sequence[str], labels: Sequence[int] | np.ndarray):
        self._fill(root, "\0".join(rels), labels)

    @classmethod
    def joined(cls, root: str, text: str, labels: Sequence[int] | np.ndarray) -> "ImageList":
        """From the relative paths already joined by NUL (the scan builds them per folder so)."""
        images = cls.__new__(cls)
        images._fill(root, text, labels)
        return images

    def _fill(self, root: str, text: str, labels: Sequence[int] | np.ndarray) -> None:
        self.root = root
        encoded = text.encode("utf-8", "surrogateescape") + b"\0" if len(labels) else b""
        self._buffer = np.frombuffer(encoded, dtype=np.uint8)
        ends = np.flatnonzero(self._buffer == 0)
        self._starts = np.concatenate([[0], ends + 1]).astype(np.int64)  # n + 1 entries: starts and the end
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self._starts) - 1:
            raise ValueError(f"{len(self._starts) - 1} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def rel(self, i: int) -> str:
        i = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        return self._buffer[self._starts[i]:self._starts[i + 1] - 1].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> tuple[str, int]:
        return os.path.join(self.root, self.rel(i)), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((os.path.join(self.root, r), t) for r, t in zip(self.rels(), self.labels.tolist()))

    def __add__(self, other) -> list[tuple[str, int]]:
        return list(self) + list(other)

    def rels(self) -> list[str]:
        """Every relative path, decoded in one go (start-up checks; not for the loader's workers)."""
        if not len(self):
            return []
        return self._buffer[:-1].tobytes().decode("utf-8", "surrogateescape").split("\0")

    def digest(self) -> str:
        """SHA-1 of the relative paths (one pass over the buffer): the same list on another mount
        point has the same digest (the ranks-agree check, the saved walk of masks/)."""
        return hashlib.sha1(self._buffer.tobytes()).hexdigest()

    def folders(self) -> Iterator[tuple[str, int, int, str]]:
        """(folder relative to root, first index, end index, the file names joined by NUL) for each
        run of images in one folder, in order. A scan keeps each folder's images together, so a
        folder is one run; runs are cut where the label changes and checked with a few string
        counts per run, not a call per image (a run that is not one flat folder is split by path)."""
        n = len(self)
        cuts = np.flatnonzero(self.labels[1:] != self.labels[:-1]) + 1 if n else []
        bounds = [0, *[int(c) for c in cuts], n] if n else []
        for a, b in zip(bounds, bounds[1:]):
            text = self._buffer[self._starts[a]:self._starts[b] - 1].tobytes().decode("utf-8", "surrogateescape")
            first = text.split("\0", 1)[0]
            prefix = first[:first.rfind("/") + 1]
            if text.count("/") == (b - a) * prefix.count("/") and text.count("\0" + prefix) == b - a - 1:
                names = text[len(prefix):].replace("\0" + prefix, "\0") if prefix else text
                yield prefix[:-1], a, b, names
                continue
            rels = text.split("\0")  # sub-folders in the run: split it where the folder changes
            folders = [os.path.dirname(rel) for rel in rels]
            start = 0
            for j in range(1, len(rels) + 1):
                if j == len(rels) or folders[j] != folders[start]:
                    cut = len(folders[start]) + 1 if folders[start] else 0
                    yield folders[start], a + start, a + j, "\0".join(rel[cut:] for rel in rels[start:j])
                    start = j

    def paths(self) -> list[str]:
        return [os.path.join(self.root, r) for r in self.rels()]

    def select(self, keep: Sequence[int] | np.ndarray) -> "ImageList":
        """The images at these indices, in this order."""
        rels = self.rels()
        keep = np.asarray(keep, dtype=np.int64)
        return ImageList(self.root, [rels[i] for i in keep.tolist()], self.labels[keep])


def image_error(path: str, e: BaseException) -> DataError:
    """One line naming the file and the fix."""
    return DataError(image_error_message(path, e))


def load_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Opens an image as RGB (from ``data`` when the file was already read); a corrupt or
    truncated file raises an error naming it."""
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
            img = Image.open(f)
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                return _high_bit_depth_to_rgb(img)
            if img.mode == "F":
                return _float_to_rgb(img, path)
            return img.convert("RGB")
    except IMAGE_ERRORS as e:
        raise image_error(path, e) from None


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit greyscale (Pillow modes I;16*, I) scaled to 8 bit: convert('RGB') clips every value
    above 255 and turns such images white."""
    values = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(values.max())
    grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


FLOAT_RANGES = (1.0, 255.0, 65535.0)  # the ranges float images are written in: [0, 1], 8 and 16 bit


def _float_to_rgb(img: Image.Image, path: str) -> Image.Image:
    """32-bit float greyscale (Pillow mode F, e.g. a float TIFF) scaled to 8 bit like the 16-bit
    path: by the smallest of [0, 1], [0, 255], [0, 65535] that holds its values (or its maximum);
    convert('RGB') truncates such values and trains a [0, 1] image as a black one. Values that are
    not finite or below 0 are no picture: a DataError naming the file."""
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all() or values.min(initial=0) < 0:
        raise DataError(f"image {path} is a 32-bit float image with values that are not finite or below 0: not a "
                        f"picture of light intensities. Convert it to 8 or 16 bit (or replace it)")
    peak = values.max(initial=0)
    top = next((r for r in FLOAT_RANGES if peak <= r), peak)
    grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


class EncodedImage:
    """An image file's bytes and size, read without decoding the pixels (``--data_backend gpu``
    decodes them on the training device); unreadable headers raise an error naming the file."""

    def __init__(self, path: str, data: bytes | None = None):
        self.path = path  # with ``data`` (read from a shard): the name of the image in errors
        try:
            if data is None:
                with open(path, "rb") as f:
                    data = f.read()
            self.data = data
            with Image.open(io.BytesIO(self.data)) as img:
                self.width, self.height = img.size
                self.is_jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
                self.orientation = image_orientation(img)  # with the header already read: no second open
        except IMAGE_ERRORS as e:
            raise image_error(path, e) from None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def decode(self) -> Image.Image:
        """The RGB pixels (for formats the GPU decoder does not read)."""
        return load_rgb(self.path, self.data)


def image_orientation(img: "Image.Image | EncodedImage") -> int:
    """The EXIF orientation (1-8; 1 when absent, unreadable or another value) of a sample's image as
    a reader returns it: a decoded image's own EXIF, or the one an EncodedImage read with its
    header. (sam.geometry.exif_orientation also opens files; a sample's image is open already.)"""
    if isinstance(img, EncodedImage):
        return img.orientation
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except (*IMAGE_ERRORS, TypeError):
        return 1
    return value if 1 <= value <= 8 else 1


_reading: list[tuple[str, float]] = []  # the file being read under a deadline, in this process


def _deadline_expired(signum, frame):
    path, seconds = _reading[-1]
    raise DataError(f"reading {path} took more than {seconds:g}s (--data_timeout): a FIFO, a hung network "
                    f"file system or a failing disk? Fix or remove the file")


@contextmanager
def read_deadline(path: str, seconds: float):
    """Raises a DataError naming ``path`` if the block (reading it) takes longer than ``seconds``: a
    FIFO, a hung network file system or a dead disk then stops the run with the file named,
    before the other ranks' collectives time out. SIGALRM, so only in a process's main thread
    (data-loader workers and the main loop); elsewhere, or with seconds <= 0, no deadline. The
    handler is installed once per process; each read only arms and disarms the timer."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGALRM) is not _deadline_expired:
        signal.signal(signal.SIGALRM, _deadline_expired)
    _reading.append((path, seconds))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _reading.pop()
