"""Claims on output files, so that several runs of one tool on one tree (two shells, array jobs
that overlap) never compute the same file twice, and temporary files of killed writers are found.

A claim is a file ``.<name>.claim`` beside the output, created exclusively (O_EXCL), holding
"<host> <pid>". It is live while that process runs (checked on this host) or, for a claim made on
another host, for CLAIM_TTL_S after it was made (one file takes seconds). A writer writes only
while it holds the claim, so a temporary file ``.<name>.tmp<pid>`` without a live claim belongs to
a writer that died.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time

CLAIM_TTL_S = 600.0
_TEMP = re.compile(r"^\.(?P<name>.+)\.(tmp\d+|claim)$")  # a temporary file, or a claim


def claim_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.claim")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def claim_is_live(claim: str) -> bool:
    try:
        with open(claim) as f:
            host, pid = f.read().split()[:2]
        age = time.time() - os.path.getmtime(claim)
    except (OSError, ValueError):  # gone (or unreadable)
        return False
    if host == socket.gethostname():
        return _pid_alive(int(pid))
    return age < CLAIM_TTL_S


def try_claim(path: str) -> bool:
    """Claims ``path`` for this process; False when another live process holds it. A claim of a
    dead process is taken over."""
    claim = claim_path(path)
    # written whole under a private name, then linked into place: link() fails if the claim exists
    # (an exclusive create, as O_EXCL), and no one ever reads a claim that is still empty
    draft = f"{claim}.tmp{os.getpid()}{threading.get_ident() % 10 ** 6}"
    for _ in range(3):
        with open(draft, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        try:
            os.link(draft, claim)
            return True
        except FileNotFoundError:  # another run's start-up sweep took the draft: write it again
            continue
        except FileExistsError:
            if claim_is_live(claim):
                return False
            try:
                os.remove(claim)  # a dead holder's: take it over
            except FileNotFoundError:
                pass
        finally:
            try:
                os.remove(draft)
            except FileNotFoundError:
                pass
    return False


def release(path: str) -> None:
    try:
        os.remove(claim_path(path))
    except FileNotFoundError:
        pass


def remove_dead_temp_files(folder: str) -> int:
    """Removes the temporary files and claims in folder whose output has no live claim (left by
    killed runs); returns how many temporary files were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and entry.is_file() and not claim_is_live(claim_path(os.path.join(folder, match["name"]))):
            try:
                os.remove(entry.path)
                removed += not entry.name.endswith(".claim")
            except FileNotFoundError:
                pass
    return removed
