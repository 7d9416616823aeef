"""The start and the command line every main_*.py shares: parse (either flag spelling), check, run
with one clear line for a user's error; the run's set-up (device, distributed, seed, output-folder
lock, the run record of code, versions and GPUs), per-epoch seeding, the TensorBoard writer, the lr
from --blr, the DDP / compile wrapping."""
from __future__ import annotations

import argparse
import datetime
import os
import random

import numpy as np
import torch

import torch.distributed as dist

from util.distributed import get_rank, get_world_size, init_distributed_mode, is_dist_avail_and_initialized, \
    is_main_process
import util.stops as stops
from util.errors import UserError
from util.files import lock_output_dir, release_output_dir_locks, writable_dir
from util.runtime import Runtime
from util.speed import compile_model, resolve_compile_flags


def run_record(world_size: int | None = None) -> dict:
    """What a reader of a results table needs to rerun a row: the code (git commit, and whether
    the tree had uncommitted changes), the library versions, the GPUs, the command line."""
    import platform
    import subprocess
    import sys

    import timm
    import torchvision
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd) -> str | None:
        try:
            out = subprocess.run(["git", "-C", repo, *cmd], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None,
            "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "timm": str(timm.__version__), "gpu": gpus[0] if gpus else None, "gpu_count": len(gpus),
            "world_size": world_size if world_size is not None else get_world_size(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "host": platform.node(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def setup_run(args: argparse.Namespace, script: str) -> Runtime:
    """Distributed init, the argument dump, device and mixed-precision choice, seeding: the run's
    Runtime (the flags in args stay as parsed)."""
    from util.misc import resolve_amp  # here: util.misc re-exports given_flags from this module
    place = init_distributed_mode(args)
    lock_output_dir(getattr(args, "output_dir", ""))  # one writer per folder; removes stale temp files
    print(f'job dir: {os.path.dirname(os.path.realpath(script))}')
    log_details(args, "args.txt", str(args).replace(', ', ',\n'), "all arguments")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu")
    if device.type == "cuda" and place["distributed"]:
        device = torch.device("cuda", place["local_rank"])
    record = run_record()  # stored with args in every checkpoint
    run = Runtime(device=device, amp=resolve_amp(args.amp, device),
                  compile_mode=getattr(args, "compile_mode", "default") if getattr(args, "compile", False) else None,
                  record=record, **place)
    print(f"code {record['git_commit'] or 'unknown'}{' (uncommitted changes)' if record['git_dirty'] else ''}; "
          f"torch {record['torch']}, torchvision {record['torchvision']}, timm {record['timm']}; "
          f"{record['world_size']} process(es), {record['gpu_count']} x {record['gpu'] or 'no GPU'}")
    seed_epoch(args.seed, 0, get_rank())
    torch.backends.cudnn.benchmark = True
    return run


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseeds every epoch from (seed, epoch, rank), so a run resumed at epoch k draws the same
    random numbers (e.g. patch masks) as one that never stopped."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)  # timm's RandAugment draws from Python's generator


def tensorboard_writer(log_dir: str | None):
    """A TensorBoard SummaryWriter for log_dir on the main process; None elsewhere or without one."""
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported only where it is used
    writable_dir(log_dir, "--log_dir")
    return SummaryWriter(log_dir=log_dir)


def log_details(args: argparse.Namespace, filename: str, text: str, what: str) -> None:
    """Long listings (all arguments, the model's structure) go to a file in the output folder,
    with one line on the console saying where; without an output folder they are printed."""
    folder = getattr(args, "output_dir", "")
    if folder and is_main_process():
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, filename), "w") as f:
            f.write(text + "\n")
        print(f"{what}: {os.path.join(folder, filename)}")
    elif not folder:  # one line: the flags given (a full listing would bury the output)
        given = [f"--{k} {getattr(args, k)}" for k in getattr(args, "given_flags", []) if hasattr(args, k)]
        print(f"{what} not written (no output folder); given: {' '.join(given) or 'none'}")


def normalise_flag_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """--flag_name and --flag-name are one flag: the spelling the parser does not define is read as
    the one it does (each command keeps one convention; the other works too)."""
    known = {s for a in parser._actions for s in a.option_strings}
    out = []
    for token in argv:
        if token.startswith("--") and " " not in token and token.split("=")[0] not in known:
            name, eq, value = token.partition("=")
            for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                if alt in known:
                    token = alt + eq + value
                    break
        out.append(token)
    return out


def run_cli(parser: argparse.ArgumentParser, check_args, main, argv: list[str] | None = None):
    """Parse, check (argparse errors, exit 2), run; a UserError prints its message and exits 1."""
    import sys
    if not parser.add_help:  # the reference's parsers are parents without -h
        parser = argparse.ArgumentParser(description=parser.prog, parents=[parser])
    argv = normalise_flag_spelling(parser, sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    resolve_compile_flags(args)
    if "log_dir" in vars(args) and args.log_dir is None:  # TensorBoard beside the run's other outputs
        args.log_dir = args.output_dir
    check_args(args, parser)
    try:
        with stops.stop_on_signals():
            try:
                result = main(args)
            except BaseException as e:  # an error raised while stopping (a worker's death) is the stop
                if stops.stopping() and not isinstance(e, (stops.Stopped, SystemExit)):
                    raise stops.Stopped(stops.stopping()) from None
                raise
        end_distributed()  # on success only: after an error the other ranks may never reach a barrier
        return result
    except UserError as e:
        print(f"ERROR: {user_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except stops.Stopped as e:
        print(stops.stop_message(parser.prog, e, newest_checkpoint(args)), file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    finally:
        release_output_dir_locks()


def newest_checkpoint(args: argparse.Namespace) -> str | None:
    """The newest complete checkpoint in the run's folder (--output_dir, or the Segmenter's --log-dir)."""
    from util.checkpoint import find_last_checkpoint
    folder = stops.PROGRESS.get("checkpoint_dir") or getattr(args, "output_dir", None) or getattr(args, "log_dir", None)
    if not folder or not os.path.isdir(folder):
        return None
    try:
        found = find_last_checkpoint(folder)
    except Exception:  # noqa: BLE001 - the stop's message must not fail
        found = None
    single = os.path.join(folder, "checkpoint.pth")  # the Segmenter keeps one, rewritten every epoch
    return found or (single if os.path.isfile(single) else None)


def user_message(e: UserError) -> str:
    """The error's own message. One raised in a DataLoader worker comes back wrapped in the
    worker's traceback ("Caught MaskFileError in DataLoader worker process 0. Original Traceback
    ..."): only the original message is kept, and where it happened."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    for name in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__name__}: "):
        i = text.rfind(name)
        if i >= 0:
            return text[i + len(name):].strip() + " (in a data loader worker)"
    return text


def end_distributed() -> None:
    """Ranks leave together and tear the process group down (a rank exiting with the group alive
    can abort on the way out)."""
    if is_dist_avail_and_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The destinations set on the command line (not by a default): an explicit flag wins over a
    checkpoint's setting, and a conflict between the two is an error."""
    actions = [(a, a.default, a.required) for a in parser._actions]
    defaults = dict(parser._defaults)
    try:
        for a, _, _ in actions:
            a.default, a.required = argparse.SUPPRESS, False
        parser._defaults.clear()
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, default, required in actions:
            a.default, a.required = default, required
        parser._defaults.update(defaults)
    return sorted(vars(given))


def check_trains_something(args: argparse.Namespace, steps_per_epoch: int, last_epoch: int) -> bool:
    """False (with a message) when a resumed run has no epoch left; an error when the flags would
    make an epoch without a single optimizer step."""
    if args.accum_iter > steps_per_epoch:
        raise UserError(f"--accum_iter {args.accum_iter} is more than the {steps_per_epoch} steps of an epoch: "
                        f"no optimizer step would ever be taken. Lower --accum_iter (or --batch_size)")
    if args.start_epoch >= last_epoch:
        print(f"Already finished ({args.start_epoch} epochs done, --epochs {last_epoch}): nothing to train")
        return False
    return True

def print_weights_fingerprint(model: torch.nn.Module) -> float:
    """Prints, on every rank, a checksum of the weights: equal lines mean the ranks ended in sync."""
    with torch.no_grad():
        value = float(sum(p.detach().double().abs().sum() for p in model.parameters()).item())
    print(f"rank {get_rank()} weights fingerprint {value:.12e}", force=True)
    return value


def set_lr_from_blr(args: argparse.Namespace) -> int:
    """lr = blr * effective batch / 256 unless --lr is given; returns the effective batch size."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:  # only base_lr is specified
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}, actual lr: {args.lr:.2e}, "
          f"accumulate grad iterations: {args.accum_iter}, effective batch size: {eff_batch_size}")
    return eff_batch_size


def wrap_model(model: torch.nn.Module, run: Runtime) -> torch.nn.Module:
    """Optional torch.compile, then DDP when distributed. Save and optimise the unwrapped model."""
    if run.compile_mode is not None:
        model = compile_model(model, run.compile_mode)
    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device.type == "cuda" else None)
    return model
