"""Experiment tracking beside the run's own logs: TensorBoard and, with --wandb PROJECT, Weights &
Biases, behind one writer (tracking_writer) whose add_scalar / add_image / flush / close go to
each. Tracking is an auxiliary output: losing its curves (a full or deleted --log_dir, W&B
unreachable) must never cost the training. wandb is an optional package, imported only for
--wandb."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading

from run.files import writable_dir
from util.misc import is_main_process


def check_wandb_available(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--wandb without the wandb package: one line at start-up, before anything runs."""
    if getattr(args, "wandb", None) and importlib.util.find_spec("wandb") is None:
        parser.error("--wandb needs the wandb package, which is not installed: pip install wandb")


def tracking_writer(args: argparse.Namespace, job_type: str):
    """The run's tracking writer on the main process (None elsewhere, or with neither TensorBoard's
    --log_dir nor --wandb): TensorBoard into args.log_dir and, with --wandb, a W&B run of
    ``job_type`` (pretrain, finetune, linprobe, segmenter) holding the whole configuration. Each
    one's first failure warns once and turns it off; training goes on."""
    if not is_main_process():
        return None
    writers = []
    tensorboard = tensorboard_writer(getattr(args, "log_dir", None))
    if tensorboard is not None:
        writers.append(tensorboard)
    if getattr(args, "wandb", None):
        wandb_run = start_wandb_run(args, job_type)
        if wandb_run is not None:
            writers.append(AuxiliaryWriter(WandbWriter(wandb_run), wandb_run.dir, "W&B"))
    if not writers:
        return None
    return writers[0] if len(writers) == 1 else TrackingWriter(writers)


def tensorboard_writer(log_dir: str | None):
    """A TensorBoard SummaryWriter for log_dir on the main process; None elsewhere or without one.
    TensorBoard is an auxiliary output: a write that fails later (a full or deleted --log_dir)
    warns once and turns it off, and training goes on (AuxiliaryWriter)."""
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported only where it is used
    writable_dir(log_dir, "--log_dir")
    return AuxiliaryWriter(SummaryWriter(log_dir=log_dir), log_dir)


def wandb_config(args: argparse.Namespace) -> dict:
    """The flags as W&B stores them: plain values, anything else as its text."""
    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return str(value)
    return {k: plain(v) for k, v in vars(args).items()}


def start_wandb_run(args: argparse.Namespace, job_type: str):
    """A W&B run for this command (offline with --wandb_offline or WANDB_MODE=offline), kept beside
    TensorBoard's files unless $WANDB_DIR says where; None, after one warning, when W&B cannot
    start (not logged in, no network)."""
    import wandb  # optional: only --wandb needs it (check_wandb_available said so at start-up)
    folder = getattr(args, "log_dir", None) or getattr(args, "output_dir", None) or None
    if folder and not os.environ.get("WANDB_DIR"):
        os.makedirs(folder, exist_ok=True)
    else:
        folder = None
    name = f"{job_type} {os.path.basename(os.path.normpath(folder))}" if folder else None
    try:
        run = wandb.init(project=args.wandb, group=getattr(args, "wandb_group", None) or None, job_type=job_type,
                         name=name, config=wandb_config(args), dir=folder,
                         mode="offline" if getattr(args, "wandb_offline", False) else None, reinit="create_new")
    except Exception as e:  # noqa: BLE001 - whatever keeps W&B from starting, training goes on
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"WARNING: W&B could not start a run in project {args.wandb} ({reason}): W&B logging is off for this "
              f"run (--wandb_offline logs without network); training goes on", file=sys.stderr, flush=True)
        return None
    _open_runs.append(run)
    return run


# W&B runs started and not yet finished: a command that fails finishes them as failed
_open_runs: list = []


def finish_open_runs(exit_code: int = 1) -> None:
    """Finishes every W&B run this process left open (a command that stopped with an error), so
    that W&B marks it failed and writes nothing after the command's own clean-up."""
    while _open_runs:
        run = _open_runs.pop()
        try:
            run.finish(exit_code=exit_code)
        except Exception:  # noqa: BLE001 - W&B is auxiliary: its own failure at the end changes nothing
            pass


class WandbWriter:
    """TensorBoard's writer calls on a W&B run. Each tag keeps the x value TensorBoard gets (steps
    in 1/1000 epoch for the training curves, epochs for the per-epoch numbers) as its own hidden
    step metric, step/<tag>: one run mixes both, and W&B's own step must only grow."""

    def __init__(self, run):
        self.run = run
        self._tags: set[str] = set()

    @property
    def log_dir(self) -> str:
        return self.run.dir

    def _log(self, tag: str, value, step) -> None:
        if tag not in self._tags:
            self.run.define_metric(f"step/{tag}", hidden=True)
            self.run.define_metric(tag, step_metric=f"step/{tag}")
            self._tags.add(tag)
        self.run.log({tag: value} if step is None else {tag: value, f"step/{tag}": step})

    def add_scalar(self, tag: str, scalar_value, global_step=None, *args, **kwargs) -> None:
        self._log(tag, float(scalar_value), global_step)

    def add_scalars(self, main_tag: str, tag_scalar_dict: dict, global_step=None, *args, **kwargs) -> None:
        for tag, value in tag_scalar_dict.items():
            self.add_scalar(f"{main_tag}/{tag}", value, global_step)

    def add_image(self, tag: str, img_tensor, global_step=None, walltime=None, dataformats: str = "CHW") -> None:
        import numpy as np
        import wandb
        image = np.asarray(img_tensor.detach().cpu() if hasattr(img_tensor, "detach") else img_tensor)
        if dataformats == "CHW":
            image = image.transpose(1, 2, 0)
        elif dataformats != "HWC":
            raise ValueError(f"add_image: dataformats {dataformats} is not handled for W&B")
        self._log(tag, wandb.Image(image), global_step)

    def flush(self) -> None:
        pass  # W&B's service writes as it goes

    def close(self) -> None:
        if self.run in _open_runs:
            _open_runs.remove(self.run)
        self.run.finish()


class TrackingWriter:
    """One writer in front of several (TensorBoard, W&B), each an AuxiliaryWriter: a call goes to
    every writer that has the method. Attributes other than methods (log_dir) are the first's."""

    def __init__(self, writers: list):
        self.writers = writers

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "writers":
            raise AttributeError(name)
        attr = getattr(self.writers[0]._writer, name, None)
        if attr is not None and not callable(attr):
            return attr

        def fan_out(*args, **kwargs):
            for writer in self.writers:
                if hasattr(writer._writer, name):
                    getattr(writer, name)(*args, **kwargs)
        return fan_out


class AuxiliaryWriter:
    """A tracking writer (TensorBoard's, W&B's) whose first failure (a full disk, a deleted or
    unmounted --log_dir, W&B's service gone) is one warning, after which it writes nothing: losing
    curves must not cost the training. Attributes other than methods (log_dir) are the writer's."""

    def __init__(self, writer, log_dir: str, name: str = "TensorBoard"):
        self._writer, self._log_dir, self._name, self.failed = writer, log_dir, name, False
        if name == "TensorBoard":
            _quiet_tensorboard_threads()

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_writer":
            raise AttributeError(name)
        attr = getattr(self._writer, name)
        if not callable(attr):
            return attr

        def guarded(*args, **kwargs):
            if self.failed:
                return None
            try:
                return attr(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - whatever the writer raises, training goes on
                self.failed = True
                reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).splitlines()[0][:200]
                print(f"WARNING: {self._name} could not write to {self._log_dir} ({reason}): {self._name} logging "
                      f"is off for the rest of this run; training goes on", file=sys.stderr, flush=True)
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
