"""LMDB image databases as pretraining roots, in the layout text-recognition data sets use
(Union14M-U, MJSynth / SynthText exports):

    <root>/data.mdb, lock.mdb    key b'num-samples' -> the count N as text,
                                 b'image-%09d' % i for i = 1 .. N -> an encoded image (JPEG, PNG, ...),
                                 b'label-%09d' -> its text (not read: MAE does not need it)

The database is opened read-only without locking, once per process and lazily: LMDB refuses a
second handle on the same database in one process, also in a forked child whose parent held one,
so every handle of a process is closed just before it forks (loader workers) and reopened when
next read.

The count is not taken on trust: the key of the last image it promises must exist. And LMDB maps
data.mdb into memory, so reading a page of a file truncated under a running job kills the process
with SIGBUS (exit 135, no message): every read first checks that the file still holds every page
the database uses, and stops with one line naming it otherwise.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os

from torch.utils.data import Dataset

from inputs.images import DataError, EncodedImage, image_orientation, load_rgb, read_deadline
from run.flags import DEFAULT_DATA_TIMEOUT_S

COUNT_KEY = b"num-samples"
IMAGE_KEY = "image-{:09d}"


def is_lmdb_root(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "data.mdb"))


_OPEN: dict[str, tuple[object, int]] = {}  # this process's handles and the bytes data.mdb must hold, by real path


def _close_all() -> None:
    for env, _ in _OPEN.values():
        env.close()
    _OPEN.clear()


os.register_at_fork(before=_close_all)


def environment(root: str, key: str | None = None):
    """This process's read-only handle on the database at root (opened on first use), after
    checking that data.mdb still holds every page the database uses; key: the root's real path,
    when the caller has it (a dataset computes it once, not per read)."""
    key = key or os.path.realpath(root)
    opened = _OPEN.get(key)
    if opened is None:
        import lmdb  # local: only LMDB roots need the package
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
            opened = _OPEN[key] = env, (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        except lmdb.Error as e:
            raise DataError(f"--data_path {root}: cannot open the LMDB database ({e})") from None
    env, needed = opened
    data_file = os.path.join(key, "data.mdb")
    try:
        size = os.stat(data_file).st_size
    except OSError as e:
        raise DataError(f"--data_path {root}: cannot read {data_file} ({e.strerror}): restore the database") from None
    if size < needed:  # a page past the end would kill this process with SIGBUS
        raise DataError(f"{data_file} is {size:,} bytes but its database uses {needed:,}: it was truncated or "
                        f"replaced (while this run read it?). Restore the database and start again")
    return env


def count_images(root: str) -> int:
    """N from the database's num-samples key, with an error naming the problem when it is absent,
    not a number, or more than the images stored (the key of image N must exist)."""
    with environment(root).begin() as txn:
        raw = txn.get(COUNT_KEY)
    if raw is None:
        raise DataError(f"--data_path {root} is an LMDB database without the key 'num-samples': the text-recognition "
                        f"layout stores the count there and the images under 'image-000000001', ...; write it in "
                        f"that layout (python tools/make_toy_data.py --lmdb_out DIR makes an example)")
    try:
        count = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"--data_path {root}: its 'num-samples' key holds {raw[:40]!r}, not a number") from None
    if count <= 0:
        raise DataError(f"--data_path {root}: the LMDB database holds no image (num-samples = {count})")
    last = IMAGE_KEY.format(count)
    with environment(root).begin() as txn:
        if txn.get(last.encode("ascii")) is None:
            found = last_image_key(txn)
            raise DataError(f"--data_path {root}: its 'num-samples' says {count:,} images, but {last} does not exist "
                            f"(the last image key is {found or 'none'}): the count is wrong or the database "
                            f"incomplete. Set num-samples to the number of images stored")
    return count


def last_image_key(txn) -> str | None:
    """The last image-... key in the database's order (None: no image key): one cursor seek."""
    cursor = txn.cursor()
    # the key just before the first one past every image-... key (or the last key of all)
    found = cursor.prev() if cursor.set_range(b"image-\xff") else cursor.last()
    key = cursor.key() if found else b""
    return key.decode("ascii", "replace") if key.startswith(b"image-") else None


class LmdbImages(Dataset):
    """One LMDB root, un-augmented: yields (PIL image or EncodedImage, None, 0). Text lines have no
    class; every image counts as class 0. Masks are not stored in an LMDB (with_masks is False)."""

    kind = "an LMDB database"

    def __init__(self, root: str, decode: bool = True, read_timeout: float = DEFAULT_DATA_TIMEOUT_S):
        self.root = root
        self.decode = decode
        self.read_timeout = read_timeout
        self.count = count_images(root)
        self.real_root = os.path.realpath(root)
        self.with_masks = False
        self.source = None
        self.rotated_masks = multiprocessing.Value("q", 0)  # as image folders count them (always 0 here)
        self.oriented_images = multiprocessing.Value("q", 0)  # images with an EXIF orientation other than 1

    def __len__(self) -> int:
        return self.count

    def describe(self) -> str:
        return f"{self.kind} ({self.count} images, keys image-000000001 ...)"

    def digest(self) -> str:
        """What every rank must agree on: the database's path and count."""
        return hashlib.sha1(f"{self.real_root}\0{self.count}".encode()).hexdigest()

    def name(self, index: int) -> str:
        return IMAGE_KEY.format(index + 1)

    def __getitem__(self, index: int):
        return self.read(index)

    def read(self, index: int, generator=None):
        """(image, None, 0): an LMDB holds images only (``generator``: unused, as no mask is chosen)."""
        key = self.name(index)
        where = f"{self.root}[{key}]"
        with read_deadline(where, self.read_timeout):
            with environment(self.root, self.real_root).begin() as txn:
                data = txn.get(key.encode("ascii"))
        if data is None:
            raise DataError(f"{where} is missing, though num-samples says {self.count}: the database is incomplete")
        img = load_rgb(where, data) if self.decode else EncodedImage(where, data)
        if image_orientation(img) != 1:
            with self.oriented_images.get_lock():
                self.oriented_images.value += 1
        return img, None, 0
