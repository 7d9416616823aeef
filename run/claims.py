"""Claims on output files, so that several runs of one tool on one tree (two shells, array jobs
that overlap) never compute the same file twice, and temporary files of killed writers are found.

A claim is a file ``.<name>.claim`` beside the output, created exclusively (O_EXCL), holding
"<host> <pid> <start>", <start> the boot and start time of that process (Linux's /proc). It is live
while that very process runs (checked on this host: a pid alone is not enough, since the system
hands a dead process's pid to a new one, which would hold the claim forever) or, for a claim made
on another host, for CLAIM_TTL_S after it was made (one file takes seconds). A claim without a
start time (an older version's) counts as live on this host for CLAIM_TTL_S at most. A writer
writes only while it holds the claim, so a temporary file ``.<name>.tmp<pid>`` without a live
claim belongs to a writer that died.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time

CLAIM_TTL_S = 600.0
_TEMP = re.compile(r"^\.(?P<name>.+)\.(tmp\d+|claim)$")  # a temporary file, or a claim
NO_START = "-"  # recorded where a process's start time cannot be read (no /proc)


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


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "boot"


def process_start(pid: int) -> str:
    """When process ``pid`` started, as "<boot id>:<clock ticks since boot>" (Linux's
    /proc/<pid>/stat, field 22): with the pid, it names one process, even after the pid is reused.
    NO_START where it cannot be read (no /proc, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # the fields after the command name, which may itself hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2:].split()
        return f"{_boot_id()}:{int(fields[19])}"  # field 22 of the line; these start at field 3
    except (OSError, ValueError, IndexError):
        return NO_START


def claim_is_live(claim: str) -> bool:
    try:
        with open(claim) as f:
            words = f.read().split()
        host, pid = words[0], int(words[1])
        age = time.time() - os.path.getmtime(claim)
    except (OSError, ValueError, IndexError):  # gone (or unreadable)
        return False
    if host != socket.gethostname():
        return age < CLAIM_TTL_S
    if not _pid_alive(pid):
        return False
    started = words[2] if len(words) > 2 else None
    if started is None:  # an older version's claim: its pid alone proves nothing after a while
        return age < CLAIM_TTL_S
    now = process_start(pid)
    return started == now or NO_START in (started, now)  # without /proc, the pid is all there is


def try_claim(path: str) -> bool:
    """Claims ``path`` for this process; False when another live process holds it. A claim of a
    dead process is taken over."""
    claim = claim_path(path)
    # written whole under a private name, then linked into place: link() fails if the claim exists
    # (an exclusive create, as O_EXCL), and no one ever reads a claim that is still empty
    draft = f"{claim}.tmp{os.getpid()}{threading.get_ident() % 10 ** 6}"
    for _ in range(3):
        with open(draft, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()} {process_start(os.getpid())}\n")
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
