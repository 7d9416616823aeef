"""Files, written safely: atomic writes (a crash leaves the old file or the new one; a full disk is
one message naming the file and the free space), JSON and JSON-lines files, checksums, and the
lock that keeps one writer per output folder (temporary files of killed writers removed)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager

import torch

from util.misc import UserError, is_main_process


class StorageError(UserError):
    """A file could not be written (full disk, quota, I/O error, read-only folder)."""


def file_digest(path: str, algorithm: str = "sha1", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (checkpoints and archives are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_sha256_record(record: str, digest: str, path: str) -> None:
    with atomic_write(record, "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")


def read_sha256_record(record: str) -> str:
    """The SHA-256 a <file>.sha256 record holds; "" when there is none, or an empty or torn one (a
    kill while an older version wrote it), which is then written anew from the file."""
    if not os.path.exists(record):
        return ""
    words = open(record, encoding="utf-8", errors="replace").read().split()
    if words and re.fullmatch(r"[0-9a-f]{64}", words[0]):
        return words[0]
    print(f"WARNING: {record} holds no SHA-256 (torn by a kill?): recorded again from the file")
    return ""


def free_space(path: str) -> str:
    """'1.2 GB free' on the file system holding path (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.1f} {unit} free" if unit != "B" else f"{free} B free"
        free /= 1000
    return ""


def _is_write_failure(e: BaseException) -> bool:
    # torch.save reports a failed write of its zip stream as a RuntimeError from PytorchStreamWriter
    text = str(e)
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and not isinstance(e, UserError) and any(
        s in text for s in ("inline_container", "unexpected pos", "PytorchStreamWriter", "file write failed")))


@contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """A file to write ``path`` through: a temporary file in the same folder, flushed, fsynced and
    renamed over ``path`` when the block ends, so a crash at any moment leaves either the old file
    or the new one, never a truncated one. On an error the temporary file is removed; a failed
    write (full disk, I/O error) becomes a StorageError naming the file and the free space."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    if not os.path.isdir(directory):
        raise StorageError(f"could not write {path}: its folder {directory} is gone (deleted, moved or unmounted while "
                           f"the run was going); restore it, or rerun with another output folder")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _is_write_failure(e):
            reason = (e.strerror or str(e)) if isinstance(e, OSError) else \
                "the write failed (file system full or failing)"  # torch's zip writer names no errno
            raise StorageError(f"could not write {path}: {reason} ({free_space(directory)} there)") from None
        raise


def atomic_torch_save(obj, path: str) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_json(path: str, obj, indent: int | None = None) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)


# ------------------------------------------------------------------------------------------------
# JSON-lines files (log.txt, results.jsonl): a torn last line (a crash mid-append) is dropped

def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a torn (unparsable) line is skipped with a warning naming it."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"WARNING: {path} line {n} is not JSON (torn by a crash?); ignored")
    return rows


_FAILED_AUXILIARY: set[str] = set()  # auxiliary files whose writes failed (said once)


def append_auxiliary(path: str, lines: list[str]) -> bool:
    """Appends lines to an auxiliary output (bad_samples.txt: a listing beside the run, not part of
    what it continues from). A failed write (a full disk, a deleted folder) is one warning, the
    first time, and the run goes on. Returns whether the lines were written."""
    try:
        with open(path, "a") as f:
            f.writelines(lines)
        return True
    except OSError as e:
        if path not in _FAILED_AUXILIARY:
            _FAILED_AUXILIARY.add(path)
            print(f"WARNING: could not append to {path} ({e.strerror or e}; {free_space(path)} there): the lines "
                  f"were not written; training goes on (this warning is not repeated)", file=sys.stderr, flush=True)
        return False


def write_jsonl(path: str, rows: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


_held_locks: dict[str, int] = {}
_TEMP_FILE = re.compile(r"^\..+\.tmp\d+$")  # atomic_write's temporary files


def writable_dir(path: str, what: str = "output folder") -> str:
    """Creates the folder ``path`` if needed and checks that files can be written in it; every
    problem (a file in the way, a dangling symlink, a read-only file system, no permission, a name
    too long) is one UserError naming the path and the fix. Returns path."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist: create that "
                        f"folder, remove the link, or pass another path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file: pass a folder (or a new path) as the {what}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(_unwritable(path, what, e)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(path) else "no permission to write there"
        raise UserError(f"cannot write in {what} {path}: {reason}; pass a writable folder")
    return path


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _unwritable(path: str, what: str, e: OSError) -> str:
    import errno
    if e.errno == errno.ENAMETOOLONG:
        longest = max((len(part.encode()) for part in os.path.abspath(path).split(os.sep)), default=0)
        return (f"cannot create {what} {path[:80]}...: the name is too long (a part of {longest} bytes; file systems "
                f"allow 255, and 4096 for the whole path); pass a shorter path")
    if e.errno == errno.EEXIST:  # a dangling link or a file among its parents
        return f"cannot create {what} {path}: a part of the path is a file or a link to nothing; pass another path"
    return f"cannot create {what} {path}: {e.strerror or e}; pass a writable folder"


def lock_output_dir(output_dir: str) -> None:
    """Takes an exclusive lock on output_dir/.lock for the life of this process (released by the
    kernel when it dies, so a killed run leaves no stale lock). A second run writing into the same
    folder (e.g. a stage orphaned by a killed benchmark) stops with the holder's pid. Holding the
    lock, temporary files left by killed writers are removed."""
    if not output_dir or not is_main_process():
        return
    writable_dir(output_dir)
    key = os.path.realpath(output_dir)
    if key in _held_locks:
        return
    fd = os.open(os.path.join(output_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"another process ({holder}) is writing to {output_dir}: wait for it to end or stop "
                        f"it, or use another output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held_locks[key] = fd
    remove_stale_temp_files(output_dir)


def unlock_output_dir(output_dir: str) -> None:
    fd = _held_locks.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        os.close(fd)


def release_output_dir_locks() -> None:
    for fd in _held_locks.values():
        os.close(fd)
    _held_locks.clear()


# what a command writes into its output folder before its first step (TensorBoard's event files
# too): a start that fails leaves a folder it created holding nothing else, which is removed
START_UP_FILES = {".lock", "args.txt", "model.txt", "optimizer.txt"}
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.")


def first_missing_folder(path: str) -> str | None:
    """The outermost folder of path that does not exist yet (what creating path creates); None
    when path exists or is empty."""
    if not path:
        return None
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    while not os.path.lexists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def holds_only_start_up_files(folder: str) -> bool:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "wandb"]  # --wandb's run folder: its copy of what was logged
        if any(name not in START_UP_FILES and not _EVENT_FILE.match(name) for name in files):
            return False
    return True


def remove_failed_start(folders: list[str]) -> list[str]:
    """Removes each folder (one this process created) that holds nothing but what a start writes
    (START_UP_FILES, TensorBoard event files, folders of them): a start that failed leaves nothing
    behind. Anything else in it keeps the folder. Returns the folders removed."""
    removed = []
    for folder in folders:
        if os.path.isdir(folder) and not os.path.islink(folder) and holds_only_start_up_files(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def remove_stale_temp_files(output_dir: str) -> None:
    """Removes the temporary files of writers that were killed mid-save (GBs for a ViT-L checkpoint).
    Called with the folder's lock held, so no live writer of this folder owns one."""
    removed = 0
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _TEMP_FILE.match(name) and os.path.isfile(path):
            removed += os.path.getsize(path)
            os.remove(path)
            print(f"removed {path}, left by a writer that was killed")
    if removed:
        print(f"{removed / 1e6:.1f} MB of stale temporary files removed from {output_dir}")
