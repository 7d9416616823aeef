"""Checkpoints and resume: what a checkpoint holds and how it is written, read, found and pruned;
what a run continues from, read once, with the flags that define the run reconciled; the
optimizer state by parameter name; which codebase a checkpoint comes from; the per-epoch log.

A checkpoint is the reference's dict (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``).
Beside the flags, ``args.config`` is one record of what later use needs to know of the run (the
model, its input size and channels, the mask method and its parameters, the input recipe, where
the run started), written explicitly rather than left to be found among the flags; the live flags
stay as parsed. Every write goes through run/files.py's
``atomic_write``; a checkpoint is written only when its weights are finite, so the newest
checkpoint is always one a run can continue from.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import math
import operator
import os
import pickle
import re
import shlex
import sys
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

from run.files import StorageError, atomic_torch_save, file_digest, read_jsonl, write_jsonl
from util.lr_decay import param_groups_layer_decay
from util.misc import UserError, is_main_process

CONFIG = "config"  # the record of the run in a checkpoint's args


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, not finite or does not fit the run."""


class AdaptationError(UserError):
    """A checkpoint that does not fit the requested model or method."""


# Our checkpoints store ``args`` as a Namespace (the reference's format); allow it in
# torch.load(weights_only=True) so no checkpoint needs unpickling of arbitrary objects.
torch.serialization.add_safe_globals([argparse.Namespace])


def append_log(output_dir: str, stats: dict) -> None:
    """Adds this epoch's row to output_dir/log.txt (main process only). The file is rewritten
    atomically: rows of this epoch or later (left by a run resumed from an older checkpoint) and a
    torn last line are dropped, so the log has one row per epoch whatever crashed when."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, "log.txt")
    rows = [r for r in read_jsonl(path) if not (isinstance(r, dict) and r.get("epoch", -1) >= stats["epoch"])]
    write_jsonl(path, rows + [stats])


# ------------------------------------------------------------------------------------------------
# reading

def load_checkpoint(path: str) -> dict:
    """Loads a checkpoint file (ours, the reference's or an official one) onto the CPU; another MAE
    codebase's is refused whole, and so is a record whose epoch or flags have impossible types or
    values (one line naming the key). The file's identity at the read is kept (check_unchanged):
    the tensors are memory-mapped and read when used, so a file written over in place meanwhile
    would give this file's record with another file's weights."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    before = file_identity(path)
    checkpoint = _read_checkpoint(path)
    _READ_AS[os.path.realpath(path)] = before
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict with 'model', "
                              f"or an official state dict): pass a checkpoint file")
    refuse_foreign(checkpoint, path)
    check_record(checkpoint, path)
    return checkpoint


def _read_checkpoint(path: str) -> dict:
    try:
        # mmap: tensors are paged in when used, so peeking at a checkpoint's args is cheap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        error = e
    if not zipfile.is_zipfile(path):  # torch's legacy format (before 1.6, or _use_new_zipfile_serialization=False)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            error = e
        else:
            print(f"{path} is in torch's legacy (non-zip) format: read without mmap")
            return checkpoint
    raise CheckpointError(f"cannot load checkpoint {path} (truncated or not a PyTorch checkpoint?): {error}")


def saved_args(checkpoint: dict) -> dict:
    """A checkpoint's flags as a dict (this repo and the reference store a Namespace, some other
    codebases a dict; official files none)."""
    saved = checkpoint.get("args")
    if saved is None:
        return {}
    return dict(saved) if isinstance(saved, dict) else vars(saved)


def checkpoint_config(checkpoint: dict) -> dict:
    """What a pretraining or finetuning checkpoint says about its run: its ``config`` record, or the
    same keys read off the flags of a checkpoint written before the record (None where it does not
    say; the mask method's parameters are those of its time: coverage_ratio, mask_ratio, seg_loss)."""
    saved = saved_args(checkpoint)
    if isinstance(saved.get(CONFIG), dict):
        return saved[CONFIG]
    keys = ("model", "input_size", "in_chans", FOURTH_CHANNEL_KEY, "mask_method", "augment", "normalization",
            "norm_pix_loss", "run_start", "nb_classes", "global_pool")
    config = {k: saved.get(k) for k in keys}
    config["method"] = {k: saved[k] for k in ("coverage_ratio", "mask_ratio", "seg_loss") if k in saved}
    return config


# ------------------------------------------------------------------------------------------------
# what a checkpoint's record may hold: a damaged or crafted record stops its reader with one line
# naming the key, never a traceback somewhere downstream

def valid_epoch(value) -> int | None:
    """A stored epoch as an int: a whole number >= 0 (not a bool, a string or a float); else None."""
    if isinstance(value, bool):
        return None
    try:
        epoch = operator.index(value)
    except TypeError:
        return None
    return epoch if epoch >= 0 else None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _input_size(v) -> bool:
    return _positive_int(v) or (isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(map(_positive_int, v)))


def _strings(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _run_start(v) -> bool:
    return isinstance(v, dict) and all(x is None or isinstance(x, (str, int, float, bool)) or _strings(x)
                                       for x in v.values())


_TEXT = (lambda v: isinstance(v, str), "a string")
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_COUNT = (_positive_int, "a positive integer")
_NUMBER = (_number, "a finite number")
# the keys of 'args' (and of its 'config' record) that readers use, with what each must be; None
# is always allowed (the key says nothing), keys not listed are not read
RECORD_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": _TEXT, "mask_method": _TEXT, "augment": _TEXT, "normalization": _TEXT, "seg_loss": _TEXT,
    "backbone": _TEXT, "decoder": _TEXT, "fourth_channel": _TEXT,
    "input_size": (_input_size, "one or two positive integers"), "crop_size": _COUNT,
    "in_chans": _COUNT, "channels": _COUNT, "nb_classes": _COUNT, "n_cls": _COUNT, "world_size": _COUNT,
    "batch_size": _COUNT, "accum_iter": _COUNT,
    "global_pool": _FLAG, "norm_pix_loss": _FLAG,
    "coverage_ratio": _NUMBER, "mask_ratio": _NUMBER, "lr": _NUMBER, "blr": _NUMBER, "max_accuracy": _NUMBER,
    "encoder_norm_eps": _NUMBER, "run_start": (_run_start, "a dict of paths and digests"),
}
# and of the 'config' record alone (another codebase's flags may use these names otherwise)
CONFIG_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **RECORD_KEYS, "method": (lambda v: isinstance(v, dict), "a dict (the mask method's parameters)"),
    "classes": (_strings, "a list of class names"),
}


def check_record(checkpoint: dict, path: str) -> None:
    """Refuses, with one line naming the key, a checkpoint whose epoch is not a whole number >= 0 or
    whose flags (``args``, and its ``config`` record) hold a value of an impossible type."""
    if "epoch" in checkpoint and valid_epoch(checkpoint["epoch"]) is None:
        raise CheckpointError(f"{path} records epoch {checkpoint['epoch']!r:.40}, which is not a whole number >= 0: "
                              f"the file is damaged or was written by other code; use another checkpoint")
    saved = checkpoint.get("args")
    if saved is not None and not isinstance(saved, (dict, argparse.Namespace)):
        raise CheckpointError(f"{path} stores its flags ('args') as type {type(saved).__name__}, not a Namespace or a "
                              f"dict: the file is damaged or was written by other code; use another checkpoint")
    saved = saved_args(checkpoint)
    config = saved.get(CONFIG)  # this repo's record is a dict (another codebase's --config may be a path)
    for where, record, keys in (("args.", saved, RECORD_KEYS),
                                (f"args.{CONFIG}.", config if isinstance(config, dict) else {}, CONFIG_KEYS)):
        for key, (fits, what) in keys.items():
            value = record.get(key)
            if value is not None and not fits(value):
                raise CheckpointError(
                    f"{path} records {where}{key} = {value!r:.60}, which is not {what}: the file is damaged or was "
                    f"written by other code; use another checkpoint")


# ------------------------------------------------------------------------------------------------
# the newest checkpoint of a folder, and pruning

def checkpoint_epochs(output_dir: str) -> list[tuple[int, str]]:
    """(number in the name, path) of every checkpoint-<number>.pth, ascending."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


class _EpochOnly(pickle.Unpickler):
    """Unpickles a checkpoint's record without its tensors: every torch object is a stand-in and
    no storage is read, so a file's stored epoch costs a few KB of reading, not a load."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("argparse", "Namespace"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        return lambda *args, **kwargs: None

    def persistent_load(self, pid):
        return None


def stored_epoch(path: str) -> int | None:
    """The epoch a checkpoint file records, read from its pickle alone (no tensor is loaded);
    None for a file that is not a readable checkpoint (truncated, foreign, of a newer layout, or
    whose epoch is not a whole number >= 0)."""
    epoch = None
    try:
        with zipfile.ZipFile(path) as archive:
            record = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            epoch = _EpochOnly(io.BytesIO(archive.read(record))).load().get("epoch")
    except Exception:  # noqa: BLE001 - truncated, foreign or torch's legacy format: read it whole
        pass
    if epoch is not None:
        return valid_epoch(epoch)
    try:  # torch's legacy format, or an epoch stored as a tensor (a stand-in above)
        return valid_epoch(_read_checkpoint(path)["epoch"])
    except Exception:  # noqa: BLE001 - not a checkpoint this run can read
        return None


def stored_epochs(output_dir: str) -> list[tuple[int, str]]:
    """(stored epoch, path) of every readable checkpoint-<number>.pth, oldest first (ties: by name).
    The stored epoch, not the name, says which is newest (a file renamed by hand, a stray): resume
    and pruning both use this, reading each file's small record only."""
    found = []
    for number, path in checkpoint_epochs(output_dir):
        epoch = stored_epoch(path)
        if epoch is None:
            print(f"WARNING: skipping unreadable checkpoint {path}")
        else:
            found.append((epoch, number, path))
    return [(epoch, path) for epoch, _, path in sorted(found)]


def find_last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir: the readable checkpoint-*.pth with the highest
    stored epoch (a truncated or foreign file is skipped)."""
    found = stored_epochs(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str, keep_last: int, just_written: str | None = None) -> None:
    """Deletes all but the newest keep_last readable numbered checkpoints, newest by stored epoch
    (as resume judges it). Never deletes just_written, and never a file it cannot read (a stray or
    foreign file is not ours to delete)."""
    found = [path for _, path in stored_epochs(output_dir)]
    keep = set(found[-max(keep_last, 1):])
    if just_written:
        keep.add(os.path.abspath(just_written))
    for path in found:
        if path not in keep and os.path.abspath(path) not in keep:
            os.remove(path)


def unreadable_message(path: str) -> str:
    quoted = shlex.quote(path)
    return (f"{path} is not a checkpoint this version can read (truncated, damaged, of a newer layout, or its epoch is "
            f"not a whole number) and this run would write over it: nothing is written over a file that could not "
            f"be read. Move it aside (mv {quoted} {shlex.quote(path + '.unreadable')}) or use another output folder")


def check_writable_names(folder: str, names) -> None:
    """Before a run trains: none of the checkpoint files it will write (``names`` in ``folder``)
    is a file it could not read (another version's, a damaged one), which the write would destroy.
    A readable file of that name is a checkpoint of this run or of one it continues."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and stored_epoch(path) is None:
            raise CheckpointError(unreadable_message(path))


# ------------------------------------------------------------------------------------------------
# a checkpoint file's identity: what it held when it was read, and what two ranks compare

_READ_AS: dict[str, tuple] = {}  # real path -> file_identity() when load_checkpoint read it


def content_fingerprint(path: str) -> str:
    """A digest of a checkpoint's contents without reading its tensors: the zip directory's name,
    size and CRC-32 of every record (torch writes each tensor as one record with its CRC, and a
    serialization id unique to each save) and the pickled record itself; a file in torch's legacy
    format is hashed whole. Two files with the same fingerprint hold the same checkpoint."""
    h = hashlib.sha1()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                h.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode("utf-8", "surrogateescape"))
                if info.filename.endswith("data.pkl"):  # small; covers a save made without CRCs
                    h.update(archive.read(info))
    except (zipfile.BadZipFile, OSError, ValueError):
        return file_digest(path) if os.path.isfile(path) else ""
    return h.hexdigest()[:16]


def file_identity(path: str) -> tuple:
    """(device, inode, size, mtime in ns, content fingerprint): changes when the file is written over,
    in place or by a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, content_fingerprint(path)


def check_unchanged(path: str) -> None:
    """Call once a checkpoint's tensors have been used (copied into a model, checked): its tensors
    are read from the file as they are used (memory-mapped), so a file written over in place since
    load_checkpoint read its record would have given that record with another file's weights. A
    file replaced by another (a new inode: an atomic save, mv, rsync) is not: the mapping keeps the
    one that was read."""
    before = _READ_AS.get(os.path.realpath(path))
    now = file_identity(path)
    if before is None or now == before or now[:2] != before[:2]:
        return  # unchanged, or replaced by another file (an atomic save): the mapped one was read whole
    raise CheckpointError(f"{path} changed while it was being read (written or copied over in place?): what was read "
                          f"may mix two files. Let the copy finish (copy to a new name, then mv it into place) and "
                          f"rerun")


# ------------------------------------------------------------------------------------------------
# writing

def first_nonfinite(state_dict: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None (one device sync)."""
    floats = [(k, v) for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).cpu()
    return None if bool(finite.all()) else floats[int((~finite).nonzero()[0])][0]


def save_checkpoint(obj: dict, path: str) -> None:
    """Writes a checkpoint dict atomically, refusing non-finite weights: a run never leaves behind a
    checkpoint it cannot continue from. Errors name the newest intact checkpoint in the folder.
    Never writes over a file that is not a readable checkpoint (check_writable_names says so at
    start-up; this holds for a file that appeared since)."""
    if os.path.lexists(path) and stored_epoch(path) is None:
        raise CheckpointError(unreadable_message(path))
    bad = first_nonfinite(obj["model"])
    if bad is not None:
        previous = _newest_intact(path)
        raise CheckpointError(
            f"the weights are not finite (NaN/inf in '{bad}') at epoch {obj.get('epoch')}: {path} was not "
            f"written. " + (f"The last good checkpoint is {previous}. " if previous else "No earlier checkpoint. ")
            + "Lower the learning rate (--blr / --lr), raise --warmup_epochs, or set --clip_grad.")
    try:
        atomic_torch_save(obj, path)
    except StorageError as e:
        previous = _newest_intact(path)
        raise StorageError(f"{e}. Nothing was overwritten"
                           + (f"; the newest intact checkpoint is {previous}" if previous else "")
                           + ". Free space (or fix the path) and rerun the same command to resume.") from None


def _newest_intact(path: str) -> str | None:
    found = find_last_checkpoint(os.path.dirname(os.path.abspath(path)))
    return found or (path if os.path.exists(path) else None)


def checkpoint_args(args: argparse.Namespace, run, config: dict | None = None) -> argparse.Namespace:
    """The flags as a checkpoint stores them: a copy of args with the values the reference's
    start-up wrote into its args (rank, world size, GPU, backend) taken from ``run``
    (run.setup.Runtime), the resolved --amp and the run record; and the run's ``config`` record,
    with the keys that readers of older checkpoints find among the flags copied there too (input
    size as [H, W], input channels, what the 4th channel holds, where the run started)."""
    saved = argparse.Namespace(**vars(args))
    saved.distributed, saved.rank, saved.world_size, saved.gpu = run.distributed, run.rank, run.world_size, run.local_rank
    if run.distributed:
        saved.dist_backend = run.dist_backend
    saved.device, saved.amp, saved.record = str(run.device), run.amp, run.record
    if config is not None:
        setattr(saved, CONFIG, config)
        for key in ("model", "input_size", "in_chans", FOURTH_CHANNEL_KEY, "mask_method", "run_start"):
            if config.get(key) is not None:
                setattr(saved, key, config[key])
    return saved


def save_model(args, epoch: int, model_without_ddp, optimizer, loss_scaler, name: str | None = None,
               run=None, config: dict | None = None, state: dict | None = None) -> str:
    """checkpoint-<epoch>.pth (or checkpoint-<name>.pth) with the reference's keys and the run's
    config record; only the main process writes. 'args' holds the flags with the run's Runtime
    values in them (run: a run.setup.Runtime). ``state``: more of the run's state to store with
    the flags (finetuning's best top-1, max_accuracy, as this repo always did).
    With --keep_last K older epoch checkpoints are pruned."""
    path = os.path.join(args.output_dir, f"checkpoint-{epoch if name is None else name}.pth")
    if is_main_process():
        saved = checkpoint_args(args, run, config) if run is not None else argparse.Namespace(**vars(args))
        for key, value in (state or {}).items():
            setattr(saved, key, value)
        save_checkpoint({
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer_state_dict(optimizer, model_without_ddp),
            "epoch": epoch,
            "scaler": loss_scaler.state_dict(),
            "args": saved,
        }, path)
        if getattr(args, "keep_last", 0) and (name is None or name.isdigit()):
            prune_checkpoints(args.output_dir, args.keep_last, just_written=path)
    return path


# ------------------------------------------------------------------------------------------------
# what a run continues from: one read, the flags that define the run reconciled, then the states

@dataclass
class Resumed:
    """The checkpoint a run continues from, read once."""
    path: str
    checkpoint: dict
    run_start: dict  # where the run started (a continued run keeps its own)

    @property
    def args(self) -> dict:
        return saved_args(self.checkpoint)

    @property
    def epoch(self) -> int:
        """The epoch it records (-1: it records none, so no epoch is done)."""
        epoch = valid_epoch(self.checkpoint.get("epoch"))
        return -1 if epoch is None else epoch


def resumed_identity(resumed: Resumed | None) -> dict:
    """What the ranks check compares of the checkpoint each rank continues (run.distributed.
    check_ranks_agree): its epoch and content fingerprint, so that ranks resuming different files
    stop at start-up instead of training together and writing a mixed checkpoint."""
    if resumed is None:
        return {"resumed checkpoint": None}
    return {"resumed checkpoint": (resumed.epoch, content_fingerprint(resumed.path))}


def open_resume(args, run_flags: dict[str, Any], start: dict | None = None, path: str | None = None,
                dashes: bool = False, settings: Callable[[dict, str], dict] | None = None,
                then: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
                upgrade: Callable[[argparse.Namespace, dict, str], None] | None = None,
                accept: Callable[[dict, str], None] | None = None) -> Resumed | None:
    """What this run continues from, read once: ``path`` (a command's own checkpoint file), else
    --resume, else (unless --no_auto_resume) the newest complete checkpoint in --output_dir, which
    becomes --resume. Auto-resume continues only a run that started where this one starts
    (``start``, see run_start; another run is an error naming both). An original segmae
    checkpoint that cannot continue is refused. Then the flags that define the run (``run_flags``:
    flag -> its value in this repo's checkpoints written before the flag existed, or None) are
    reconciled with the checkpoint's (reconcile_flags), then ``then(args)``'s (flags that depend on
    those: a mask method's own), and ``upgrade(args, checkpoint, path)`` continues a checkpoint of
    an earlier layout as it was trained. None: the run starts afresh. ``settings(checkpoint,
    path)``: the checkpoint's flags where they are not its 'args' (another codebase's layout).
    ``accept(checkpoint, path)`` raises where the file is not what the command continues (before
    its flags are read)."""
    auto = False
    if path is None:
        path = getattr(args, "resume", "")
        if not path and getattr(args, "output_dir", "") and getattr(args, "auto_resume", True):
            path = find_last_checkpoint(args.output_dir) or ""
            auto = bool(path)
    if not path:
        return None
    checkpoint = load_checkpoint(path)  # the one read
    theirs = checkpoint_config(checkpoint).get("run_start")
    if auto:
        check_same_start(start, theirs, args.output_dir, path)
        print(f"Auto-resume: found {path} in --output_dir")
        args.resume = path  # --resume's default: the newest checkpoint of the output folder
    refuse_original_to_continue(checkpoint, path, "--resume")
    if accept is not None:
        accept(checkpoint, path)
    saved = settings(checkpoint, path) if settings is not None else saved_args(checkpoint)
    # the values before a flag existed hold for checkpoints of this repo and the original segmae code
    predates = checkpoint_origin(checkpoint) in ("repo", "segmae")
    reconcile_flags(args, list(run_flags), saved, path, dashes, run_flags if predates else {})
    if then is not None:
        more = then(args)
        reconcile_flags(args, list(more), saved, path, dashes, more if predates else {})
    if upgrade is not None:
        upgrade(args, checkpoint, path)
    return Resumed(path, checkpoint, theirs or start or {})


def resume_states(resumed: Resumed, model_without_ddp: torch.nn.Module, optimizer=None, loss_scaler=None,
                  weights: dict | None = None) -> int:
    """Loads the weights (``weights``, default the checkpoint's 'model'; and, given an optimizer,
    its state and the loss scaler's) of the checkpoint the run continues; returns the first epoch
    to train (0 when it holds no optimizer state)."""
    checkpoint, path = resumed.checkpoint, resumed.path
    weights = checkpoint.get("model") if weights is None else weights
    bad = first_nonfinite(weights) if weights is not None else None
    if bad is not None:
        raise CheckpointError(f"--resume {path} holds non-finite weights (NaN/inf in '{bad}'): resume "
                              f"from an earlier checkpoint (--resume PATH) or move this one away")
    try:
        model_without_ddp.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"--resume {path} does not fit this model ({mismatch_hint(str(e))}): "
                              f"{str(e).splitlines()[-1].strip()}") from None
    print(f"Resume checkpoint {path}")
    if optimizer is None:
        check_unchanged(path)
        return 0
    state = checkpoint.get("optimizer")
    if not isinstance(state, dict) or not state or "epoch" not in checkpoint:
        check_unchanged(path)
        absent = {"no optimizer state": not isinstance(state, dict) or not state, "no epoch": "epoch" not in checkpoint}
        missing = " and ".join(what for what, is_absent in absent.items() if is_absent)
        hint = (f"; to continue its schedule after epoch {resumed.epoch}, pass --start_epoch {resumed.epoch + 1}"
                if resumed.epoch >= 0 else "")
        print(f"WARNING: --resume {path} holds {missing}: its weights are loaded, the optimizer starts afresh (no "
              f"moments) and the epochs count from --start_epoch (0 unless given), lr warmup included{hint}",
              file=sys.stderr)
        return 0
    load_optimizer_state(optimizer, state, model_without_ddp)
    if loss_scaler is not None and "scaler" in checkpoint:
        loss_scaler.load_state_dict(checkpoint["scaler"])
    check_unchanged(path)
    print("With optim & sched!")
    return resumed.epoch + 1


def mismatch_hint(error: str) -> str:
    """Which flag to look at for a load_state_dict size mismatch."""
    if "head." in error or "head.weight" in error:
        return "check --nb_classes / --n-cls"
    if "pos_embed" in error:
        return "check --input_size / --crop-size"
    if "patch_embed" in error:
        return "check --model (patch size) and the input channels"
    return "check --model"


def _normalised(key: str, value):
    if key == "input_size" and isinstance(value, (list, tuple)):
        return [int(value[0]), int(value[-1])]
    if key == "input_size" and isinstance(value, int):  # the reference stores one int for a square
        return [value, value]
    return value


def _flag_value(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def reconcile_flags(args, keys: list[str], saved: dict, path: str, dashes: bool = False,
                    before: dict | None = None) -> list[str]:
    """Flags that define a run (or a model to evaluate) must agree with the checkpoint's (``saved``):
    a flag given on the command line that disagrees is an error naming both values; one left at
    its default takes the checkpoint's value (so resuming or evaluating needs no retyping). A flag
    the checkpoint predates takes its value of that time (``before``; a different one given is an
    error). dashes: the command spells its flags --crop-size rather than --crop_size. Returns the
    flags taken from the checkpoint."""
    flag = (lambda k: "--" + k.replace("_", "-")) if dashes else (lambda k: "--" + k)
    given = set(getattr(args, "given_flags", []))
    taken = []
    for key in keys:
        if key in saved:
            theirs, note = saved[key], ""
        elif (before or {}).get(key) is not None:
            theirs, note = before[key], f" (written before {flag(key)} existed)"
        else:
            continue
        ours = getattr(args, key, None)
        if _normalised(key, ours) == _normalised(key, theirs):
            continue
        if key in given:
            predates = f" (it predates {flag(key)})" if note else ""
            raise CheckpointError(
                f"{path} was trained with {flag(key)} {_flag_value(theirs)}{predates}, but this run has "
                f"{flag(key)} {_flag_value(ours)}: pass {flag(key)} {_flag_value(theirs)} (or leave it out) to use "
                f"that checkpoint, or start a new run in another output folder")
        print(f"{flag(key)} {_flag_value(theirs)} taken from {path}{note}")
        setattr(args, key, theirs)
        taken.append(key)
    return taken


def reconcile_with_checkpoint(args, keys: list[str], path: str | None = None, dashes: bool = False,
                              saved: dict | None = None) -> list[str]:
    """reconcile_flags against the checkpoint at ``path`` (default --resume; read here unless its
    flags are given as ``saved``); nothing without one."""
    path = path if path is not None else getattr(args, "resume", "")
    if not path:
        return []
    saved = saved if saved is not None else saved_args(load_checkpoint(path))
    return reconcile_flags(args, keys, saved, path, dashes)


def run_start(args, files: list[str], keys: list[str] = ("data_path",)) -> dict:
    """Where a run starts: the flags in keys (paths made absolute) and, for each flag in files
    (e.g. --finetune, --stack), the file's absolute path and SHA-256. Stored in the checkpoint's
    args, it lets auto-resume continue only the run this command would start."""
    start: dict = {}
    for key in keys:
        value = getattr(args, key, None)
        if key == "data_path" and value is not None:
            value = [os.path.abspath(p) for p in ([value] if isinstance(value, str) else value)]
        start[key] = value
    for key in files:
        path = getattr(args, key, "") or ""
        start[key] = os.path.abspath(path) if path else ""
        start[key + "_sha256"] = file_digest(path, "sha256") if path and os.path.isfile(path) else ""
    return start


def _real_paths(start: dict) -> dict:
    """run_start with its paths resolved: the same data reached through a symlink is the same run."""
    real = dict(start)
    for key, value in start.items():
        if key == "data_path" and value is not None:
            real[key] = [os.path.realpath(p) for p in ([value] if isinstance(value, str) else value)]
        elif key + "_sha256" in start and value:
            real[key] = os.path.realpath(value)
    return real


def _describe(start: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in start.items() if v and not k.endswith("_sha256")) or "scratch"


def check_same_start(start: dict | None, theirs: dict | None, output_dir: str, path: str) -> None:
    """Auto-resume continues only the run this command starts: another start is an error naming
    both (the same data reached through a symlink is the same run)."""
    if start is None or theirs is None:
        return
    mine, theirs_real = _real_paths(start), _real_paths(theirs)
    differ = [k for k in start if k in theirs and mine[k] != theirs_real[k]]
    if not differ:
        return
    changed = [k for k in differ if k.endswith("_sha256") and mine[k[:-7]] == theirs_real.get(k[:-7])]
    what = (f"{', '.join(k[:-7] for k in changed)} has the same path but other contents" if changed
            else f"this command starts from {_describe(start)}, that run from {_describe(theirs)}")
    raise CheckpointError(
        f"--output_dir {output_dir} holds {path}, a run that did not start where this command starts ({what}). "
        f"Use another --output_dir for a new run, or pass --resume {path} to continue that one")


def auto_resume(args, start: dict | None = None) -> str | None:
    """Without --resume, --resume becomes the newest complete checkpoint in --output_dir (a plain
    rerun after a crash or a preemption picks up where the run stopped), but only of a run that
    started where this command starts. Reads that checkpoint; open_resume does this and more in
    the same read."""
    resumed = open_resume(args, {}, start) if not getattr(args, "resume", "") else None
    return resumed.path if resumed is not None else None


# ------------------------------------------------------------------------------------------------
# optimizer state by parameter name: a checkpoint's moments go to the same parameters whatever the
# group order (ours store the names; the reference's order is reconstructed)

def optimizer_param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each of the optimizer's groups, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """optimizer.state_dict() with each group's parameter names ('param_names', as PyTorch writes for
    named parameters), so the state can be matched by name when the order changes."""
    state = optimizer.state_dict()
    for group, names in zip(state["param_groups"], optimizer_param_names(optimizer, model)):
        group.setdefault("param_names", names)
    return state


def _reference_group_names(model: torch.nn.Module) -> list[list[str]] | None:
    """The groups the original MAE code (timm 0.3.2) made for this model: there fc_norm is
    registered after head, so the layer-decay groups come in another order."""
    params = list(model.named_parameters())
    if not any(n.startswith("fc_norm.") for n, _ in params) or not hasattr(model, "blocks"):
        return None
    moved = [x for x in params if not x[0].startswith("fc_norm.")]
    at = max(i for i, (n, _) in enumerate(moved) if n.startswith("head")) + 1
    moved[at:at] = [x for x in params if x[0].startswith("fc_norm.")]

    class ReferenceOrder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = model.blocks

        def named_parameters(self, *a, **k):
            return iter(moved)

    names = {id(p): n for n, p in params}
    groups = param_groups_layer_decay(ReferenceOrder(), no_weight_decay=model.no_weight_decay()
                                      if hasattr(model, "no_weight_decay") else ())
    return [[names[id(p)] for p in g["params"]] for g in groups]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, model: torch.nn.Module) -> None:
    """Loads an optimizer state, matching parameters by name: names stored with the state, or, for
    a state written by the original MAE code, the names its parameter order implies."""
    ours = optimizer_param_names(optimizer, model)
    saved_groups = state["param_groups"]
    theirs = [g.get("param_names") for g in saved_groups]
    same_shape = [len(g["params"]) for g in saved_groups] == [len(n) for n in ours]
    if any(t is None for t in theirs):
        theirs = None if same_shape else _reference_group_names(model)
    if theirs is None or theirs == ours:
        try:
            optimizer.load_state_dict(state)
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({e}); resume "
                                  f"with the same model and flags, or start the optimizer afresh") from None
        return
    where = {name: idx for names, g in zip(theirs, saved_groups) for name, idx in zip(names, g["params"])}
    missing = [n for names in ours for n in names if n not in where]
    if missing:
        raise CheckpointError(f"the checkpoint's optimizer state has no entry for {missing[:3]}: it was made for "
                              f"another model")
    remapped, index = {}, 0
    groups = []
    for names, group in zip(ours, optimizer.state_dict()["param_groups"]):
        new_ids = []
        for name in names:
            if where[name] in state["state"]:
                remapped[index] = state["state"][where[name]]
            new_ids.append(index)
            index += 1
        groups.append({**group, "params": new_ids})
    optimizer.load_state_dict({"state": remapped, "param_groups": groups})
    print("optimizer state matched to the parameters by name")


# ------------------------------------------------------------------------------------------------
# which codebase a checkpoint comes from, read off its contents: this repo's, the original segmae
# code's (DeinAlptraum/mae: its args have mask_method and none of this repo's flags, its
# preencoder checkpoints a CombinedModel), facebookresearch/mae's and the official files, or
# another MAE codebase whose model is not this one (refused whole)

# recorded in the args of this repo's checkpoints: a mask channel holds v = 1 - m (the original's: m)
FOURTH_CHANNEL_KEY = "fourth_channel"

# flags that only this repo writes into a checkpoint's args (the original segmae code has none of them)
_OWN_ARGS = ("data_timeout", "in_chans", "amp", "data_backend", "fold_mask_channel")


def checkpoint_origin(checkpoint: dict) -> str:
    """'repo' (this code), 'segmae' (the original segmae code: its args have mask_method and none
    of this repo's flags) or 'reference' (facebookresearch/mae, official files: patches only)."""
    saved = checkpoint.get("args")
    if saved is None:
        return "reference"
    has = (lambda k: k in saved) if isinstance(saved, dict) else (lambda k: hasattr(saved, k))  # noqa: E731
    if any(has(k) for k in (FOURTH_CHANNEL_KEY, CONFIG) + _OWN_ARGS):
        return "repo"
    return "segmae" if has("mask_method") else "reference"


def is_segmae_combined(sd: dict) -> bool:
    """The original segmae code's preencoder checkpoint: model.* (the MAE) + encoder.* (its conv)."""
    return "encoder.weight" in sd and any(k.startswith("model.") for k in sd)


def state_dict_of(checkpoint: dict) -> dict:
    """The weights in a checkpoint dict ('model', 'state_dict' or the dict itself)."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def mae_pytorch_kind(checkpoint: dict) -> str | None:
    """'pretraining' or 'finetuned' for a checkpoint of pengzhiliang/MAE-pytorch (BEiT's ViT: the
    encoder under ``encoder.`` beside ``encoder_to_decoder``, or a ViT with BEiT's ``q_bias`` and
    no class token), else None."""
    sd = checkpoint.get("module") if isinstance(checkpoint.get("module"), dict) else state_dict_of(checkpoint)
    if not isinstance(sd, dict):
        return None
    def beit_without_cls(prefix: str) -> bool:  # BEiT's attention biases, no class token
        return f"{prefix}cls_token" not in sd and any(k.startswith(f"{prefix}blocks.") and k.endswith(".attn.q_bias")
                                                       for k in sd)
    # (Segmenter's checkpoints also hold encoder.blocks.*, with a class token and timm's qkv bias)
    if "encoder_to_decoder.weight" in sd or beit_without_cls("encoder."):
        return "pretraining"
    if beit_without_cls(""):
        return "finetuned"
    return None


def refuse_foreign(checkpoint: dict, path: str) -> None:
    """A checkpoint of another MAE codebase whose model is not this repo's is refused whole: loading
    the tensors whose names happen to match would train a silently different model."""
    kind = mae_pytorch_kind(checkpoint) if isinstance(checkpoint, dict) else None
    if kind:
        raise AdaptationError(
            f"{path} is a MAE-pytorch (pengzhiliang/MAE-pytorch) {kind} checkpoint: its ViT has no class token "
            f"and a fixed 1-D sine-cosine position table that the file does not store, where this repo's ViT "
            f"(facebookresearch/mae's) has a class token and a 2-D table, so it cannot be loaded here, in whole "
            f"or in part. Start from an official MAE checkpoint (facebookresearch/mae) or one of this repo's")


PREENCODER_NOT_CONTINUABLE = (
    "its pre-encoder is a Conv2d(4, 3, kernel 16, padding 'same') that mixes neighbouring patches, where this "
    "repo's is a per-patch Conv2d(4, 3*p*p) + PixelShuffle; the weights do not map onto each other, so its "
    "pretraining cannot be continued (or reconstructed) here. Its encoder works downstream: --finetune, "
    "main_linprobe.py, segmenter.train --mae-chp, evals.knn, tools/export.py")


def refuse_original_to_continue(checkpoint: dict, path: str, flag: str = "--resume") -> None:
    """Continuing an original segmae checkpoint whose weights need converting is refused: its
    optimizer state belongs to the other parametrisation (or model)."""
    if is_segmae_combined(state_dict_of(checkpoint)):
        raise AdaptationError(f"{flag} {path}: a preencoder checkpoint of the original segmae code; "
                              + PREENCODER_NOT_CONTINUABLE)
    saved = checkpoint.get("args")
    method = saved.get("mask_method") if isinstance(saved, dict) else getattr(saved, "mask_method", None)
    if checkpoint_origin(checkpoint) == "segmae" and method == "four_channels":
        raise AdaptationError(f"{flag} {path}: a four_channels checkpoint of the original segmae code, whose 4th "
                              f"channel is the hidden mask m where this repo's is v = 1 - m; its optimizer state "
                              f"belongs to that parametrisation. Continue from its weights with --stack {path} "
                              f"(converted exactly, fresh optimizer), or use it downstream as it is")
