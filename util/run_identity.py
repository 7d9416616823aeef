"""Which run a command continues: where a run started (run_start: data roots, --finetune / --stack
files and their SHA-256), auto-resume of only that run from --output_dir, and the flags that define
a run reconciled with the checkpoint it continues (a default is taken from it, a conflict is an
error naming both values)."""
from __future__ import annotations

import argparse
import os

from util.checkpoint import find_last_checkpoint, load_checkpoint
from util.errors import CheckpointError
from util.files import file_digest


def _normalised(key: str, value):
    if key == "input_size" and isinstance(value, (list, tuple)):
        return [int(value[0]), int(value[-1])]
    if key == "input_size" and isinstance(value, int):  # the reference stores one int for a square
        return [value, value]
    return value


def reconcile_with_checkpoint(args, keys: list[str], path: str | None = None, dashes: bool = False,
                              saved: argparse.Namespace | None = None) -> None:
    """Flags that define a run (or a model to evaluate) must agree with the checkpoint (--resume
    unless path is given): a flag given on the command line that disagrees is an error naming both
    values; one left at its default takes the checkpoint's value (so resuming or evaluating needs
    no retyping). dashes: the command spells its flags --crop-size rather than --crop_size.
    saved: the checkpoint's settings where they are not its 'args' (another codebase's layout)."""
    path = path if path is not None else getattr(args, "resume", "")
    if not path:
        return
    saved = saved if saved is not None else load_checkpoint(path).get("args")
    if saved is None:
        return
    flag = (lambda k: "--" + k.replace("_", "-")) if dashes else (lambda k: "--" + k)
    given = set(getattr(args, "given_flags", []))
    for key in keys:
        if not hasattr(saved, key):
            continue
        ours, theirs = _normalised(key, getattr(args, key, None)), _normalised(key, getattr(saved, key))
        if ours == theirs:
            continue
        if key in given:
            raise CheckpointError(
                f"{path} was trained with {flag(key)} {_flag_value(theirs)}, but this run has "
                f"{flag(key)} {_flag_value(ours)}: pass {flag(key)} {_flag_value(theirs)} (or leave it out) to use that "
                f"checkpoint, or start a new run in another output folder")
        print(f"{flag(key)} {_flag_value(theirs)} taken from {path}")
        setattr(args, key, getattr(saved, key))
        args.from_checkpoint = [*getattr(args, "from_checkpoint", []), key]  # as binding as a given flag


def _flag_value(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


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


def auto_resume(args, start: dict | None = None) -> None:
    """Without --resume, continue from the newest complete checkpoint in --output_dir (a plain
    rerun after a crash or a preemption picks up where the run stopped) -- but only a run that
    started where this command starts (``start``, see run_start); another one is an error that
    names both. The run's start is kept in args.run_start (a continued run keeps its own)."""
    if start is not None:
        args.run_start = start
    if args.resume or not args.output_dir or not getattr(args, "auto_resume", True):
        return
    last = find_last_checkpoint(args.output_dir)
    if not last:
        return
    saved = load_checkpoint(last).get("args")
    theirs = getattr(saved, "run_start", None)
    if start is not None and theirs is not None:
        mine, theirs_real = _real_paths(start), _real_paths(theirs)
        differ = [k for k in start if k in theirs and mine[k] != theirs_real[k]]
        if differ:
            changed = [k for k in differ if k.endswith("_sha256") and mine[k[:-7]] == theirs_real.get(k[:-7])]
            what = (f"{', '.join(k[:-7] for k in changed)} has the same path but other contents" if changed
                    else f"this command starts from {_describe(start)}, that run from {_describe(theirs)}")
            raise CheckpointError(
                f"--output_dir {args.output_dir} holds {last}, a run that did not start where this command "
                f"starts ({what}). Use another --output_dir for a new run, or pass --resume {last} to continue "
                f"that one")
    print(f"Auto-resume: found {last} in --output_dir")
    args.resume = last
    if theirs is not None:
        args.run_start = theirs
