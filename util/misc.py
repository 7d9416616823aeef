"""Distributed set-up, metric logging, mixed precision and checkpoints."""
from __future__ import annotations

import argparse
import builtins
import datetime
import glob
import hashlib
import json
import os
import re
import time
from collections import defaultdict, deque
from contextlib import contextmanager

import torch
import torch.distributed as dist

from util.errors import UserError
from util.speed import compile_model, resolve_compile_flags

# Our checkpoints store ``args`` as a Namespace (the reference's format); allow it in
# torch.load(weights_only=True) so no checkpoint needs unpickling of arbitrary objects.
torch.serialization.add_safe_globals([argparse.Namespace])

_builtin_print = builtins.print  # wrapped (not re-wrapped) by setup_for_distributed


# ------------------------------------------------------------------------------------------------
# distributed

def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silences print() on every rank but the first (print(..., force=True) still prints)."""
    builtin_print = _builtin_print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        force = force or (get_world_size() > 8)
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print(f"[{now}] ", end="")
            builtin_print(*args, **kwargs)

    builtins.print = print


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Reads torchrun (RANK/WORLD_SIZE/LOCAL_RANK), OpenMPI (--dist_on_itp) or SLURM variables.
    One process without any of them runs undistributed. NCCL on GPUs, gloo on CPU."""
    env = os.environ
    if args.dist_on_itp:
        args.rank = int(env["OMPI_COMM_WORLD_RANK"])
        args.world_size = int(env["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    elif "RANK" in env and "WORLD_SIZE" in env:
        args.rank = int(env["RANK"])
        args.world_size = int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(env["SLURM_PROCID"])
        args.world_size = int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
        if args.dist_url == "env://":
            # the first node of the allocation hosts the rendezvous
            os.environ.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")))
            os.environ.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        print("Not using distributed mode")
        setup_for_distributed(is_master=True)
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return

    args.distributed = True
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {args.dist_backend}): {args.dist_url}", flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def first_slurm_host(nodelist: str) -> str:
    """'gpu[003-005,010],cpu1' -> 'gpu003' (SLURM's compressed host list, first entry)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def all_reduce_mean(x: float) -> float:
    world_size = get_world_size()
    if world_size == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return (t / world_size).item()


# ------------------------------------------------------------------------------------------------
# logging without a host-device sync per step: tensors are kept on device and read at print time

class SmoothedValue:
    """Window and global averages of a stream of numbers or 0-d tensors."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n: int = 1) -> None:
        self.deque.append(value)
        self.total = self.total + value * n  # stays a device tensor when value is one
        self.count += n

    def _window(self) -> torch.Tensor:
        return torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in self.deque])

    def synchronize_between_processes(self) -> None:
        """Sums the global totals over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([float(self.count), float(self.total)], dtype=torch.float64, device=device)
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return self._window().median().item()

    @property
    def avg(self) -> float:
        return self._window().mean().item()

    @property
    def global_avg(self) -> float:
        return float(self.total) / max(self.count, 1)

    @property
    def max(self) -> float:
        return self._window().max().item()

    @property
    def value(self) -> float:
        return float(self.deque[-1])

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.detach()
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in self.meters:
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable, print_freq: int, header: str = "", batch_size: int | None = None,
                  on_print=None):
        """Yields from iterable; every print_freq steps prints meters, ETA and img/s. ``on_print`` is
        called just before each print (e.g. to check a device-side flag)."""
        total = len(iterable)
        start = last = time.time()
        width = len(str(total))
        for i, obj in enumerate(iterable):
            yield obj
            if i % print_freq == 0 or i == total - 1:
                if on_print is not None:
                    on_print(i)
                now = time.time()
                steps = print_freq if i > 0 else 1
                iter_time = (now - last) / steps
                eta = datetime.timedelta(seconds=int(iter_time * (total - i - 1)))
                speed = f"  {batch_size * get_world_size() / max(iter_time, 1e-9):.1f} img/s" if batch_size else ""
                mem = ""
                if torch.cuda.is_available():
                    mem = f"  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB"
                print(f"{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  "
                      f"time: {iter_time:.4f}{speed}{mem}")
                last = now
        total_time = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total, 1):.4f} s / it)")


# ------------------------------------------------------------------------------------------------
# mixed precision

def resolve_amp(amp: str | None, device: torch.device) -> str:
    """'bf16' | 'fp16' | 'none'. None picks bf16 on GPUs that support it, else none."""
    if amp is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
    return amp


def autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class LossScaler:
    """Backward + (optional clip) + step. Scales the loss only for fp16; a no-op scaler otherwise.
    Its state_dict is GradScaler's, stored under the checkpoint key 'scaler' as in the reference."""
    state_dict_key = "amp_scaler"

    def __init__(self, enabled: bool = False):
        self._scaler = torch.amp.GradScaler("cuda", enabled=enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        norm = None
        if clip_grad is not None:
            assert parameters is not None
            self._scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._scaler.load_state_dict(state_dict)


# ------------------------------------------------------------------------------------------------
# checkpoints

def file_digest(path: str, algorithm: str = "sha1", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (checkpoints and archives are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """A file to write ``path`` through: a temporary file in the same folder, flushed, fsynced and
    renamed over ``path`` when the block ends, so a crash at any moment leaves either the old file
    or the new one, never a truncated one. On an error the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_json(path: str, obj, indent: int | None = None) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)


def save_model(args, epoch: int, model_without_ddp, optimizer, loss_scaler, name: str | None = None) -> str:
    """checkpoint-<epoch>.pth (or checkpoint-<name>.pth) with the reference's keys; only the main
    process writes. A failed write (full disk, I/O error) stops the run with a message and leaves
    every earlier checkpoint as it was; with --keep_last K older epoch checkpoints are pruned."""
    path = os.path.join(args.output_dir, f"checkpoint-{epoch if name is None else name}.pth")
    if is_main_process():
        try:
            atomic_torch_save({
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "scaler": loss_scaler.state_dict(),
                "args": args,
            }, path)
        except OSError as e:
            previous = find_last_checkpoint(args.output_dir)
            raise CheckpointError(
                f"could not write {path}: {e.strerror or e}. Nothing was overwritten"
                + (f"; the newest complete checkpoint is {previous}" if previous else "")
                + ". Free space (or fix the path) and resume.") from None
        if getattr(args, "keep_last", 0) and name is None:
            prune_checkpoints(args.output_dir, args.keep_last)
    return path


def checkpoint_epochs(output_dir: str) -> list[tuple[int, str]]:
    """(number in the name, path) of every checkpoint-<number>.pth, ascending."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: str, keep_last: int) -> None:
    """Deletes all but the newest keep_last numbered checkpoints (never the newest one)."""
    found = checkpoint_epochs(output_dir)
    for _, path in found[:-max(keep_last, 1)]:
        os.remove(path)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def load_checkpoint(path: str) -> dict:
    """Loads a checkpoint file (ours, the reference's or an official one) onto the CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # mmap: tensors are paged in when used, so peeking at a checkpoint's args is cheap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"cannot load checkpoint {path} (truncated or not a PyTorch checkpoint?): {e}") from None


def load_model(args, model_without_ddp, optimizer, loss_scaler) -> None:
    """--resume: restores model, optimizer, scaler and sets args.start_epoch."""
    if not args.resume:
        return
    checkpoint = load_checkpoint(args.resume)
    saved = checkpoint.get("args")
    for key in ("mask_method", "model"):
        ours, theirs = getattr(args, key, None), getattr(saved, key, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise CheckpointError(f"--resume {args.resume} was trained with --{key} {theirs}, but this run has "
                                  f"--{key} {ours}: pass --{key} {theirs} to continue it, or start a new run")
    try:
        model_without_ddp.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"--resume {args.resume} does not fit this model: {e}") from None
    print(f"Resume checkpoint {args.resume}")
    if "optimizer" in checkpoint and "epoch" in checkpoint and not getattr(args, "eval", False):
        optimizer.load_state_dict(checkpoint["optimizer"])
        args.start_epoch = checkpoint["epoch"] + 1
        if hasattr(saved, "max_accuracy"):  # finetuning's best top-1 so far
            args.max_accuracy = saved.max_accuracy
        if "scaler" in checkpoint:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        print("With optim & sched!")


def find_last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir, judged by content: the readable
    checkpoint-*.pth with the highest stored epoch (a truncated or foreign file is skipped)."""
    best, best_epoch = None, -1
    for _, path in reversed(checkpoint_epochs(output_dir)):
        try:
            epoch = int(load_checkpoint(path)["epoch"])
        except (UserError, KeyError, TypeError, ValueError):
            print(f"WARNING: skipping unreadable checkpoint {path}")
            continue
        if epoch > best_epoch:
            best, best_epoch = path, epoch
    return best


def auto_resume(args) -> None:
    """Without --resume, continue from the newest complete checkpoint in --output_dir (a plain
    rerun after a crash or a preemption picks up where the run stopped)."""
    if args.resume or not args.output_dir or not getattr(args, "auto_resume", True):
        return
    last = find_last_checkpoint(args.output_dir)
    if last:
        print(f"Auto-resume: found {last} in --output_dir")
        args.resume = last


def append_log(output_dir: str, stats: dict) -> None:
    """One JSON line per epoch in output_dir/log.txt (main process only)."""
    if is_main_process():
        with open(os.path.join(output_dir, "log.txt"), "a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops before anything more is saved."""


class LossMonitor:
    """Counts non-finite losses on the device and, only when a progress line is printed, checks the
    count (all ranks together, so they stop together) and logs the rank-averaged loss and the lr
    to TensorBoard. The training loop itself never waits for the GPU."""

    def __init__(self, metric_logger: MetricLogger, device: torch.device, epoch: int, steps_per_epoch: int,
                 args, log_writer=None, loss_tag: str = "train_loss", hint: str = "Lower --blr."):
        self.metric_logger, self.epoch, self.steps_per_epoch = metric_logger, epoch, steps_per_epoch
        self.args, self.log_writer, self.loss_tag, self.hint = args, log_writer, loss_tag, hint
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor) -> None:
        """Call every step with the loss. A detached copy is kept: under CUDA graphs the loss
        tensor itself is overwritten by the next step."""
        loss = loss.detach().clone()
        self.nonfinite_steps += (~torch.isfinite(loss)).long()
        self.metric_logger.update(loss=loss)

    def __call__(self, step: int) -> None:
        state = torch.stack([self.nonfinite_steps.double(), self.metric_logger.loss.deque[-1].double()])
        if self.args.distributed:
            dist.all_reduce(state)
        bad, loss_sum = state.tolist()
        if bad > 0:
            raise NonFiniteLossError(
                f"loss is not finite (NaN or inf) at epoch {self.epoch}, step <= {step}; stopping. Nothing "
                f"was saved for this epoch, the last checkpoint in {self.args.output_dir or 'output_dir'} is "
                f"intact. {self.hint}")
        if self.log_writer is not None:
            # x-axis in units of 1/1000 epoch, so that curves of different batch sizes line up
            epoch_1000x = int((step / self.steps_per_epoch + self.epoch) * 1000)
            self.log_writer.add_scalar(self.loss_tag, loss_sum / get_world_size(), epoch_1000x)
            self.log_writer.add_scalar('lr', self.metric_logger.lr.value, epoch_1000x)


def tensorboard_writer(log_dir: str | None):
    """A TensorBoard SummaryWriter for log_dir on the main process; None elsewhere or without one."""
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported only where it is used
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def epoch_progress(data_loader, epoch: int, device: torch.device, args, log_writer=None,
                   loss_tag: str = "train_loss", hint: str = "Lower --blr."):
    """The progress logging of one training epoch, shared by every training loop: a MetricLogger
    with an lr meter, the LossMonitor that checks the losses when a line is printed, and the
    iterator over data_loader that prints. Returns (metric_logger, monitor, iterator)."""
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    monitor = LossMonitor(metric_logger, device, epoch, len(data_loader), args, log_writer,
                          loss_tag=loss_tag, hint=hint)
    iterator = metric_logger.log_every(data_loader, args.print_freq, f'Epoch: [{epoch}]',
                                       batch_size=args.batch_size, on_print=monitor)
    return metric_logger, monitor, iterator


# ------------------------------------------------------------------------------------------------
# the start and the command line of every main_*.py

def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseeds every epoch from (seed, epoch, rank), so a run resumed at epoch k draws the same
    random numbers (e.g. patch masks) as one that never stopped."""
    import random

    import numpy as np
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % 2 ** 31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)  # timm's RandAugment draws from Python's generator


def setup_run(args: argparse.Namespace, script: str) -> torch.device:
    """Distributed init, the argument dump, device and mixed-precision choice, seeding."""
    init_distributed_mode(args)
    print(f'job dir: {os.path.dirname(os.path.realpath(script))}')
    print(str(args).replace(', ', ',\n'))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu")
    args.amp = resolve_amp(args.amp, device)
    resolve_compile_flags(args)
    seed_epoch(args.seed, 0, get_rank())
    torch.backends.cudnn.benchmark = True
    return device


def run_cli(parser: argparse.ArgumentParser, check_args, main, argv: list[str] | None = None):
    """Parse, check (argparse errors, exit 2), run; a UserError prints its message and exits 1."""
    import sys
    if not parser.add_help:  # the reference's parsers are parents without -h
        parser = argparse.ArgumentParser(description=parser.prog, parents=[parser])
    args = parser.parse_args(argv)
    check_args(args, parser)
    try:
        return main(args)
    except UserError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


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


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Optional torch.compile, then DDP when distributed. Save and optimise the unwrapped model."""
    if args.compile:
        model = compile_model(model, getattr(args, "compile_mode", "default"))
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
    return model
