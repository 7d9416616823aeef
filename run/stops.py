"""Stopping on SIGTERM (SLURM, Kubernetes, `timeout`) and SIGINT (Ctrl-C) with one line instead of
silence or a traceback: what stopped the run, where it was (util.misc.PROGRESS), the newest
complete checkpoint, and "run the same command to resume"; the exit status is 128 + the signal's
number, as a shell reports a process killed by it. (A loss that is not finite stops a run too:
util.misc.LossMonitor.)

The signal becomes a ``Stopped`` exception in the main thread, so every ``finally`` runs: an atomic
write in progress removes its temporary file and leaves the previous file in place.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

from util.misc import PROGRESS

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a repeat within this many seconds is the same stop delivered twice (the terminal's process group
# and the parent's forwarding); a later one means "now": the process exits at once
REPEAT_GRACE_S = 2.0


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT (a BaseException, as KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_first_stop: list[tuple[float, int]] = []  # (when, signal) of the first stop


_owner: list[int] = []  # the process that installed the handlers (forked loader workers inherit them)


def stopping() -> int:
    """The stop signal that arrived (0: none); an error raised while stopping is part of the stop."""
    return _first_stop[0][1] if _first_stop else 0


def _handler(signum, frame):
    if _owner and os.getpid() != _owner[0]:  # a loader worker: leave quietly, the main process reports
        os._exit(128 + signum)
    if _first_stop:
        if time.monotonic() - _first_stop[0][0] > REPEAT_GRACE_S:
            os._exit(128 + signum)
        return
    _first_stop.append((time.monotonic(), signum))
    raise Stopped(signum)


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Stopped inside the block (main thread only; elsewhere a no-op), unless
    the process already handles them otherwise."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a signal someone else handles (submitit: SIGTERM is bypassed, SIGUSR2 requeues) is left to them
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS
                if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler, _handler)}
    _first_stop.clear()
    _owner[:] = [os.getpid()]
    PROGRESS.clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def where() -> str:
    """'at epoch 2, step 3/8' (the log lines' numbering) from the training loop's last report."""
    header, step, steps = PROGRESS.get("header", ""), PROGRESS.get("step"), PROGRESS.get("steps")
    if "stage" in PROGRESS:  # the benchmark: the stage it was running
        return f"during its stage {PROGRESS['stage']}"
    if step is None:
        return ""
    epoch = header.partition("[")[2].partition("]")[0]
    place = f"at epoch {epoch}, " if epoch else (f"in {header.strip(': ')}, " if header else "")
    return f"{place}step {step}/{steps}"


def stop_message(prog: str, stop: Stopped, newest_checkpoint: str | None, resumable: bool = True) -> str:
    place = where()
    line = f"{prog} stopped by {signal.Signals(stop.signum).name}" + (f" {place}" if place else "")
    if newest_checkpoint:
        line += f"; newest complete checkpoint: {newest_checkpoint}"
    elif resumable:
        line += "; no checkpoint was written yet"
    if resumable:
        line += "; run the same command to resume"
    return line
