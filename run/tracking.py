"""Experiment tracking beside the run's own logs: the TensorBoard writer. Tracking is an
auxiliary output: losing its curves (a full or deleted --log_dir) must never cost the training."""
from __future__ import annotations

import sys
import threading

from run.files import writable_dir
from util.misc import is_main_process


def tensorboard_writer(log_dir: str | None):
    """A TensorBoard SummaryWriter for log_dir on the main process; None elsewhere or without one.
    TensorBoard is an auxiliary output: a write that fails later (a full or deleted --log_dir)
    warns once and turns it off, and training goes on (AuxiliaryWriter)."""
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported only where it is used
    writable_dir(log_dir, "--log_dir")
    return AuxiliaryWriter(SummaryWriter(log_dir=log_dir), log_dir)


class AuxiliaryWriter:
    """A TensorBoard writer whose first failure (a full disk, a deleted or unmounted --log_dir) is
    one warning, after which it writes nothing: losing TensorBoard curves must not cost the
    training. Attributes other than methods (log_dir) are the writer's."""

    def __init__(self, writer, log_dir: str):
        self._writer, self._log_dir, self.failed = writer, log_dir, False
        _quiet_tensorboard_threads()

    def __getattr__(self, name: str):
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def guarded(*args, **kwargs):
            if self.failed:
                return None
            try:
                return attr(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - whatever TensorBoard's writer raises, training goes on
                self.failed = True
                reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).splitlines()[0][:200]
                print(f"WARNING: TensorBoard could not write to {self._log_dir} ({reason}): TensorBoard logging is off "
                      f"for the rest of this run; training goes on", file=sys.stderr, flush=True)
                return None
        return guarded


_TENSORBOARD_THREAD = "_AsyncWriterThread"  # tensorboard's event-file writer thread


def _quiet_tensorboard_threads() -> None:
    """TensorBoard's writer thread re-raises a failed write as an uncaught exception, which Python
    prints as a traceback; the same error reaches the writer's next call, where AuxiliaryWriter
    reports it once. Other threads' exceptions are printed as before."""
    if getattr(threading.excepthook, "quiet_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(exc):
        if type(exc.thread).__name__ != _TENSORBOARD_THREAD:
            previous(exc)

    hook.quiet_tensorboard = True
    threading.excepthook = hook
