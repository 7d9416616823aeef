"""A run's set-up, from the command line to a running process: parse (either flag spelling), check,
run with one clear line for a user's error; the process's place (ranks, device), mixed precision,
torch.compile and FP8, the optimizer, seeding, the lr from --blr, the
DDP / compile wrapping, and the run record (code, versions, GPUs).

What a run derives at start-up is one ``Runtime``, kept apart from the flags it was given (the
parsed flags stay as parsed); a checkpoint stores both, in the reference's layout
(run.checkpoint.checkpoint_args).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

import run.stops as stops
from run.checkpoint import find_last_checkpoint
from run.distributed import init_distributed_mode
from run.files import first_missing_folder, lock_output_dir, release_output_dir_locks, remove_failed_start
from run.flags import COMPILE_MODES, add_local_rank_arg, check_habits, given_flags, normalise_flag_spelling
from run.tracking import check_wandb_available, finish_open_runs
from util.lars import LARS
from util.misc import (PROGRESS, UserError, get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process,
                       print_on_every_rank)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: str = "none"  # "bf16", "fp16" or "none": --amp resolved for the device (bf16 where supported)
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU index on this node
    dist_backend: str = ""  # "nccl" or "gloo" when distributed
    compile_mode: str | None = None  # the torch.compile mode, None when not compiled
    record: dict = field(default_factory=dict)  # run_record()


def run_record(world_size: int | None = None) -> dict:
    """What a reader of a results table needs to rerun a row: the code (git commit, and whether
    the tree had uncommitted changes), the library versions, the GPUs, the command line."""
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
    place = init_distributed_mode(args)
    lock_output_dir(getattr(args, "output_dir", ""))  # one writer per folder; removes stale temp files
    print(f'job dir: {os.path.dirname(os.path.realpath(script))}')
    log_details(args, "args.txt", str(args).replace(', ', ',\n'), "all arguments")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise no_gpu_error("--device cuda", "--device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}); pass one of them, or --device cuda")
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


def no_gpu_error(asked: str, instead: str) -> UserError:
    """The one line for a command that asks for GPUs (``asked``: its flag and value) where none is
    visible, and what to pass instead."""
    return UserError(f"{asked} was asked for but no GPU is visible; use {instead}")


def check_gpu_count(flag: str, wanted: int, cuda_visible: str | None = None) -> None:
    """``wanted`` GPUs (one process each) must be visible: without any, ``flag`` is refused as
    --device cuda is; with fewer, the count there is is named. ``cuda_visible``: the
    CUDA_VISIBLE_DEVICES the processes will get (e.g. '0,2'), when set."""
    if wanted <= 1 and not torch.cuda.is_available():
        return  # one process: the CPU runs it
    if not torch.cuda.is_available():
        raise no_gpu_error(f"{flag} {wanted}", f"{flag} 1 (one process on the CPU)")
    visible = torch.cuda.device_count()
    if cuda_visible:
        visible = min(visible, len([g for g in cuda_visible.split(",") if g.strip()]))
    if wanted > visible:
        raise UserError(f"{flag} {wanted}: only {visible} GPU(s) are visible; pass {flag} {visible} or fewer")


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseeds every epoch from (seed, epoch, rank), so a run resumed at epoch k draws the same
    random numbers (e.g. patch masks) as one that never stopped."""
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)  # timm's RandAugment draws from Python's generator


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


def run_cli(parser: argparse.ArgumentParser, check_args, main, argv: list[str] | None = None):
    """Parse, check (argparse errors, exit 2), run; a UserError prints its message and exits 1."""
    if not parser.add_help:  # the reference's parsers are parents without -h
        parser = argparse.ArgumentParser(description=parser.prog, parents=[parser])
    add_local_rank_arg(parser)  # every command that takes ranks starts under torchrun or torch.distributed.launch
    argv = normalise_flag_spelling(parser, sys.argv[1:] if argv is None else list(argv))
    check_habits(parser, argv)
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    resolve_compile_flags(args)
    if "log_dir" in vars(args) and args.log_dir is None:  # TensorBoard beside the run's other outputs
        args.log_dir = args.output_dir
    check_args(args, parser)
    cap_loader_workers(args, parser)
    check_wandb_available(args, parser)
    # the output folders this command creates: a start that fails (before any step) removes them
    created = [f for f in dict.fromkeys(first_missing_folder(getattr(args, k, "") or "")
                                        for k in ("output_dir", "log_dir")) if f]
    PROGRESS.pop("step", None)
    try:
        with stops.stop_on_signals():
            try:
                result = main(args)
            except BaseException as e:  # an error raised while stopping (a worker's death) is the stop
                if failed(e):
                    finish_open_runs(exit_code=1)
                if failed(e) and "step" not in PROGRESS and process_rank() == 0:
                    remove_failed_start(created)
                if stops.stopping() and not isinstance(e, (stops.Stopped, SystemExit)):
                    raise stops.Stopped(stops.stopping()) from None
                raise
        end_distributed()  # on success only: after an error the other ranks may never reach a barrier
        return result
    except UserError as e:
        print_error(user_message(e))
        raise SystemExit(1) from None
    except stops.Stopped as e:
        print(stops.stop_message(parser.prog, e, newest_checkpoint(args)), file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except RuntimeError as e:  # a collective failed: another rank stopped (its own ERROR line says why) or died
        if not (distributed_process() and lost_another_rank(e)):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0]).split(". ")[0][:200]
        print_error(f"lost contact with another rank ({reason}): it stopped or died; its own ERROR line above says "
                    f"why (or it was killed: see the launcher's message)")
        raise SystemExit(1) from None
    finally:
        release_output_dir_locks()


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity: a SLURM or container limit), as the
    DataLoader counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cap_loader_workers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """More loader workers than usable cores (the reference's default 10 on a laptop) only contend,
    and the DataLoader warns at every loader it makes: the count is capped at the cores, said once."""
    workers, cpus = getattr(args, "num_workers", None), usable_cpus()
    if not isinstance(workers, int) or workers <= cpus:
        return
    flag = next((a.option_strings[0] for a in parser._actions if a.dest == "num_workers"), "--num_workers")
    if process_rank() == 0:
        print(f"NOTE: {flag} {workers} is more than the {cpus} CPU core{'s' * (cpus > 1)} this process can use: "
              f"{cpus} loader worker{'s' * (cpus > 1)} per rank")
    args.num_workers = cpus


def failed(e: BaseException) -> bool:
    """Whether e ends a command as a failure (SystemExit(0) is a normal end)."""
    return not (isinstance(e, SystemExit) and e.code in (0, None))


# what a collective raises when another rank is gone (gloo's transport errors are plain RuntimeErrors)
_LOST_RANK_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "remote worker")


def lost_another_rank(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or any(m in str(e) for m in _LOST_RANK_MARKERS)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def distributed_process() -> bool:
    """Whether this process is one rank of several (also before or after the process group)."""
    return (get_world_size() > 1 or _env_int("WORLD_SIZE", 1) > 1
            or ("SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", 1) > 1))


def process_rank() -> int:
    if is_dist_avail_and_initialized():
        return get_rank()
    return _env_int("RANK", _env_int("SLURM_PROCID", 0))


def print_error(message: str) -> None:
    """A fatal error's one line on stderr, from every rank (print() is silenced on ranks other than
    the first), prefixed with the rank when the job has several: a rank that stops alone (its own
    --data_path is wrong) is seen."""
    where = f" (rank {process_rank()})" if distributed_process() else ""
    print_on_every_rank(f"ERROR{where}: {message}", file=sys.stderr, flush=True)


def newest_checkpoint(args: argparse.Namespace) -> str | None:
    """The newest complete checkpoint in the run's folder (--output_dir, or the Segmenter's --log-dir)."""
    folder = PROGRESS.get("checkpoint_dir") or getattr(args, "output_dir", None) or getattr(args, "log_dir", None)
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


def run_tool(main, argv=None):
    """Runs a tool's main(argv); a UserError prints its message (no traceback) and exits 1."""
    try:
        return main(argv)
    except UserError as e:
        print_error(user_message(e))
        raise SystemExit(1) from None


def end_distributed() -> None:
    """Ranks leave together and tear the process group down (a rank exiting with the group alive
    can abort on the way out)."""
    if is_dist_avail_and_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def check_trains_something(args: argparse.Namespace, steps_per_epoch: int, last_epoch: int,
                           start_epoch: int | None = None) -> bool:
    """False (with a message) when a resumed run has no epoch left (``start_epoch``: the first to
    train, default --start_epoch); an error when the flags would make an epoch without a single
    optimizer step."""
    start_epoch = args.start_epoch if start_epoch is None else start_epoch
    if args.accum_iter > steps_per_epoch:
        raise UserError(f"--accum_iter {args.accum_iter} is more than the {steps_per_epoch} steps of an epoch: "
                        f"no optimizer step would ever be taken. Lower --accum_iter (or --batch_size)")
    if start_epoch >= last_epoch:
        print(f"Already finished ({start_epoch} epochs done, --epochs {last_epoch}): nothing to train")
        return False
    return True


def print_weights_fingerprint(model: torch.nn.Module) -> float:
    """Prints, on every rank, a checksum of the weights: equal lines mean the ranks ended in sync."""
    with torch.no_grad():
        value = float(sum(p.detach().double().abs().sum() for p in model.parameters()).item())
    print(f"rank {get_rank()} weights fingerprint {value:.12e}", force=True)
    return value


def set_lr_from_blr(args: argparse.Namespace, resumed: dict | None = None) -> int:
    """lr = blr * effective batch / 256 unless --lr is given; returns the effective batch size.
    ``resumed``: the flags of the checkpoint a run continues; another effective batch (ranks x
    --batch_size x --accum_iter) than it trained with would change the lr in the middle of its
    schedule, so it is refused unless --accept_batch_change, and then said with the lr the run
    continues with."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    given_lr = args.lr is not None
    if args.lr is None:  # only base_lr is specified
        args.lr = args.blr * eff_batch_size / 256
    if resumed and not getattr(args, "eval", False):
        check_same_effective_batch(args, resumed, eff_batch_size, given_lr)
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}, actual lr: {args.lr:.2e}, "
          f"accumulate grad iterations: {args.accum_iter}, effective batch size: {eff_batch_size}")
    return eff_batch_size


def check_same_effective_batch(args: argparse.Namespace, saved: dict, eff_batch_size: int, given_lr: bool) -> None:
    """A resumed run keeps its effective batch, or says (with --accept_batch_change) that it changes."""
    factors = {"ranks": get_world_size(), "--batch_size": args.batch_size, "--accum_iter": args.accum_iter}
    theirs = {"ranks": saved.get("world_size"), "--batch_size": saved.get("batch_size"),
              "--accum_iter": saved.get("accum_iter")}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in theirs.values()):
        return  # a checkpoint that does not say (an official one, another codebase's)
    before = theirs["ranks"] * theirs["--batch_size"] * theirs["--accum_iter"]
    if before == eff_batch_size:
        return
    changed = ", ".join(f"{k} {theirs[k]} -> {factors[k]}" for k in factors if factors[k] != theirs[k])
    old_lr = saved.get("lr")
    known = isinstance(old_lr, (int, float)) and not isinstance(old_lr, bool)
    old = f" (it trained with lr {old_lr:.2e})" if known else ""
    if not getattr(args, "accept_batch_change", False):
        raise UserError(
            f"--resume {args.resume} was trained with an effective batch of {before} and this run has {eff_batch_size} "
            f"({changed}): the batch{'' if given_lr else ' and the lr'} would change in the middle of its "
            f"schedule{old}. Resume with the same ranks, "
            f"--batch_size and --accum_iter, or pass --accept_batch_change to continue with the new batch")
    how = "--lr as given" if given_lr else f"--blr {args.blr:.2e} x {eff_batch_size} / 256"
    print(f"WARNING: the effective batch changes from {before} to {eff_batch_size} ({changed}) "
          f"(--accept_batch_change): the run continues with lr {args.lr:.2e} ({how}){old}", file=sys.stderr)


def wrap_model(model: torch.nn.Module, run: Runtime) -> torch.nn.Module:
    """Optional torch.compile, then DDP when distributed. Save and optimise the unwrapped model."""
    if run.compile_mode is not None:
        model = compile_model(model, run.compile_mode)
    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device.type == "cuda" else None)
    return model


# ------------------------------------------------------------------------------------------------
# mixed precision, compilation, FP8

def resolve_amp(amp: str | None, device: torch.device) -> str:
    """'bf16' | 'fp16' | 'none'. None picks bf16 on GPUs that support it, else none."""
    if amp is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
    return amp


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """torch.compile; ``reduce-overhead`` also records the step as CUDA graphs (one launch per
    graph instead of one per kernel), which pays when kernels are short (small models / batches)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=None if mode == "default" else mode)


def resolve_compile_flags(args) -> None:
    """``--compile_mode`` other than default implies ``--compile``."""
    if getattr(args, "compile_mode", "default") != "default":
        args.compile = True


def fp8_layer_filter(module: nn.Module, name: str) -> bool:
    """Which Linear layers run in FP8: every transformer Linear whose sizes the FP8 matmul accepts
    (multiples of 16), except the pixel-regression head ``decoder_pred`` and classifier heads, whose
    outputs are the loss's inputs and keep full precision, as is usual for FP8 training."""
    if not isinstance(module, nn.Linear):
        return False
    if name.split(".")[-1] in ("decoder_pred", "head"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: nn.Module, device: torch.device) -> int:
    """Swaps the Linear layers chosen by fp8_layer_filter for torchao's Float8Linear (dynamic
    per-tensor scaling: e4m3 forward, e5m2 gradients), in place. Weights, their names and the
    checkpoint format stay those of nn.Linear. Returns the number of layers converted.

    FP8 matmuls run on GPUs of compute capability 8.9+ (Ada, Hopper); on the CPU torchao emulates
    them (slowly), which is how the tests check the numbers."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is "
                        f"{major}.{minor}. Train without --fp8 (bf16 is the default).")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("--fp8 needs torchao: pip install torchao") from None
    names = [name for name, m in model.named_modules() if fp8_layer_filter(m, name)]
    convert_to_float8_training(model, module_filter_fn=fp8_layer_filter)
    return len(names)


# ------------------------------------------------------------------------------------------------
# the optimizer: AdamW (fused on GPUs) or LARS

ADAMW_IMPLS = ("auto", "fused", "foreach", "forloop")


def build_optimizer(args, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer the flags name: --opt adamw with --opt_betas / --opt_eps, or --opt lars."""
    if args.opt == "lars":
        return LARS(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    return adamw(param_groups, lr=args.lr, device=device, betas=tuple(args.opt_betas), eps=args.opt_eps)


def adamw(param_groups: list[dict], lr: float, device: torch.device, betas=(0.9, 0.95),
          impl: str = "auto", eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW. ``auto``: the fused kernel on GPUs (one launch for all parameters), PyTorch's default
    elsewhere; ``fused`` / ``foreach`` / ``forloop`` force an implementation (same numbers, different
    speed; perf/throughput.py compares them)."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"unknown AdamW implementation {impl!r}; choose one of {', '.join(ADAMW_IMPLS)}")
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "default"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False},
              "default": {}}[impl]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, **kwargs)
