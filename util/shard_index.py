"""Which tar shards a data path names, and how many samples each holds.

Sample counts come from the ``shards.json`` that tools/write_shards.py writes beside the shards;
for tars without one (SA-1B), from one pass over the tar headers at the first start, saved as
``.segmae_shard_counts.json`` beside them (or in the user's cache when that folder is read-only)
and read again while each tar keeps its size and modification time.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile

from util.errors import UserError
from util.files import atomic_write_json

SHARD_INDEX = "shards.json"  # written by tools/write_shards.py: the shards, their sample counts, the classes
COUNTS_FILE = ".segmae_shard_counts.json"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def is_shard_path(path: str) -> bool:
    """A data path that names shards: a .tar file, a brace pattern (``train-{000..099}.tar``), a
    glob, or a folder of .tar files without a train/ folder."""
    if path.endswith(".tar") or "{" in path or "*" in path:
        return True
    return (os.path.isdir(path) and not os.path.isdir(os.path.join(path, "train"))
            and bool(glob.glob(os.path.join(path, "*.tar"))))


def expand_shards(path: str) -> list[str]:
    """The tar files a shard path names, sorted."""
    if "{" in path:
        import braceexpand
        paths = list(braceexpand.braceexpand(path))
    elif "*" in path:
        paths = glob.glob(path)
    elif os.path.isdir(path):
        paths = glob.glob(os.path.join(path, "*.tar"))
    else:
        paths = [path]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise UserError(f"--data_path {path}: {len(missing)} of {len(paths)} shard(s) do not exist, e.g. "
                        f"{(missing or [path])[0]}. Pass a folder of .tar files, a .tar file or a pattern like "
                        f"/data/shards/train-{{000000..000099}}.tar")
    return sorted(paths)


def _key_and_suffix(name: str) -> tuple[str | None, str]:
    base = os.path.basename(name)
    if "." not in base:
        return None, ""
    stem, suffix = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), suffix.lower()


def count_samples(tar_path: str) -> int:
    """Samples (keys with an image) in one tar, from its headers: the data is seeked over."""
    keys = set()
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                key, suffix = _key_and_suffix(member.name)
                if member.isfile() and key is not None and suffix in IMAGE_SUFFIXES:
                    keys.add(key)
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"cannot read shard {tar_path}: {e}. Rewrite or remove it") from None
    return len(keys)


def _counts_paths(folder: str) -> list[str]:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(os.path.realpath(folder).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [os.path.join(folder, COUNTS_FILE), os.path.join(cache, "segmae", "shards", f"{digest}.json")]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def shard_counts(paths: list[str]) -> tuple[list[int], list[str]]:
    """(samples per shard, class names or []) from shards.json, else from the saved header counts,
    else by counting (and saving the counts)."""
    counts: dict[str, int] = {}
    classes: list[str] = []
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        index = _read_json(os.path.join(folder, SHARD_INDEX))
        for entry in index.get("shards", []):
            counts[os.path.join(folder, entry["name"])] = int(entry["samples"])
        classes = classes or list(index.get("classes", []))
        saved = {}
        for candidate in _counts_paths(folder):
            saved.update(_read_json(candidate))
        fresh = {}
        for p in paths:
            ap = os.path.abspath(p)
            if os.path.dirname(ap) != folder or ap in counts:
                continue
            st = os.stat(ap)
            name = os.path.basename(ap)
            known = saved.get(name)
            if known and known[:2] == [st.st_size, st.st_mtime_ns]:
                counts[ap] = int(known[2])
            else:
                counts[ap] = count_samples(ap)
                fresh[name] = [st.st_size, st.st_mtime_ns, counts[ap]]
        if fresh:
            _save_counts(folder, {**saved, **fresh})
    return [counts[os.path.abspath(p)] for p in paths], classes


def _save_counts(folder: str, counts: dict) -> None:
    for candidate in _counts_paths(folder):
        try:
            os.makedirs(os.path.dirname(candidate), exist_ok=True)
            atomic_write_json(candidate, counts)
            return
        except OSError:
            continue  # a read-only data folder: the user's cache
