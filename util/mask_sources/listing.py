"""Listing the folders of masks/, with the standard library only, so that this file also runs as a
script in a second process: at a first start masks/ is listed there while the first process walks
train/ (two trees of a million entries each, listed side by side on two cores).

    python -I -S util/mask_sources/listing.py MASK_ROOT    writes a pickle of list_tree(MASK_ROOT)

A folder's listing is a plain tuple (pickled across the two processes):
(mtime in ns, taken before the listing, or -2 when the folder is absent; its file names sorted and
joined by NUL; its non-hidden sub-folder names, sorted). Symbolic links are followed; a link whose target
is gone is left out.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

Listing = tuple  # (mtime_ns, files joined by NUL, sub-folder names)
ABSENT = -2  # the mtime of an absent folder, as util.scan_index.folder_mtimes reads one


def list_folder(path: str) -> Listing:
    try:
        mtime = os.stat(path).st_mtime_ns  # before the listing: a change after it changes the mtime again
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:
        return ABSENT, "", []
    files = [e.name for e in entries if e.is_file(follow_symlinks=False)]  # plain files: the listing says so
    dirs = []
    if len(files) < len(entries):  # links, folders and the rare other kinds: one look each
        for entry in entries:
            if entry.name.startswith(".") or entry.is_file(follow_symlinks=False):
                continue
            try:
                if entry.is_dir():  # follows links
                    dirs.append(entry.name)
                elif not entry.is_symlink() or os.path.exists(entry.path):  # not a link to nothing
                    files.append(entry.name)
            except OSError:
                continue
    files.sort()
    dirs.sort()
    return mtime, "\0".join(files), dirs


def list_tree(mask_root: str) -> dict[str, Listing]:
    """masks/ itself ('') and every folder directly in it (the class folders), each listed."""
    listings = {"": list_folder(mask_root)}
    for name in listings[""][2]:
        listings[name] = list_folder(os.path.join(mask_root, name))
    return listings


class ListedInBackground:
    """list_tree(mask_root) in a second Python process, started at once; ``result()`` waits for it
    ({} when it could not run: the caller then lists each folder itself)."""

    def __init__(self, mask_root: str):
        self.started = time.time()  # the listing's folder times are from after this
        try:
            self.process = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), mask_root],
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            self.process = None

    def result(self) -> dict[str, Listing]:
        if self.process is None:
            return {}
        out, _ = self.process.communicate()
        ok = self.process.returncode == 0
        self.process = None
        try:
            return pickle.loads(out) if ok else {}
        except Exception:  # noqa: BLE001 - whatever went wrong there, the folders are listed here
            return {}

    def close(self) -> None:
        """Stops it if its result was not needed."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


if __name__ == "__main__":
    sys.stdout.buffer.write(pickle.dumps(list_tree(sys.argv[1]), protocol=pickle.HIGHEST_PROTOCOL))
