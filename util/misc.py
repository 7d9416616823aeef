"""What the MAE reference's util/misc.py holds: what a training step calls around the model. The
process's rank, metric logging without a host-device sync per step (device tensors are read at
print time) and the check that stops a run whose loss is not finite, mixed precision (autocast,
loss scaling), the CUDA-graph step marker, and the base of the errors a user can fix. A run's
set-up, checkpoints and signals are the run/ package's."""
from __future__ import annotations

import builtins
import datetime
import string
import time
import weakref
from collections import defaultdict, deque

import torch
import torch.distributed as dist

_builtin_print = builtins.print  # wrapped (not re-wrapped) by setup_for_distributed
# where the training loop is: header, step, steps (set by MetricLogger.log_every); stage and
# checkpoint_dir (set by the benchmark while a stage runs): run/stops.py's message on a signal
PROGRESS: dict = {}
# the torch.compile modes with CUDA graphs: they need a step marker (mark_step_begin)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class UserError(RuntimeError):
    """An error a user can cause and fix (a wrong path, a missing or corrupt file, a mismatched
    checkpoint, a loss that is not finite): the command lines print its message, which names the
    problem and the fix, as one line without a traceback and exit with status 1. Each concern has
    its own kind (inputs.images.DataError, sam.files.MaskFileError, run.checkpoint.CheckpointError)."""


# ------------------------------------------------------------------------------------------------
# the process's place in the job (the process group itself: run/distributed.py)

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


def print_on_every_rank(*args, **kwargs) -> None:
    """print() as it is before setup_for_distributed silences the other ranks: for what every rank
    must say (its fatal error)."""
    _builtin_print(*args, **kwargs)


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
        if not self.deque:  # nothing recorded yet (e.g. every step so far was skipped)
            return "-"
        # only the statistics the format shows: each one reads device values
        used = {name for _, name, _, _ in string.Formatter().parse(self.fmt) if name}
        return self.fmt.format(**{name: getattr(self, name) for name in used})


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
                  on_print=None, epochs_after: int = 0):
        """Yields from iterable; every print_freq steps (and at the last) prints meters, the
        epoch's ETA (and the run's, with epochs_after more epochs of the same length to go), the
        seconds per step and img/s of the steps since the previous line (exact for a shorter last
        interval). The ETA comes from a smoothed rate (StepRate), which is carried over the epochs
        of one iterable (a training run's loader). ``on_print`` is called just before each print
        (e.g. to check a device-side flag)."""
        total = len(iterable)
        rate = step_rate_of(iterable)
        start = last = time.time()
        last_step = -1
        width = len(str(total))
        for i, obj in enumerate(iterable):
            PROGRESS.update(header=header, step=i, steps=total)  # for the line a stop signal prints
            yield obj
            if i % print_freq == 0 or i == total - 1:
                if on_print is not None:
                    on_print(i)
                now = time.time()
                steps = i - last_step  # exact: the last interval of an epoch may be shorter
                iter_time = (now - last) / steps
                rate.update(now - last, steps, includes_first=last_step < 0)
                eta = datetime.timedelta(seconds=int(rate.seconds_for(total - i - 1)))
                if epochs_after > 0:
                    run_eta = datetime.timedelta(seconds=int(rate.seconds_for(total - i - 1, epochs_after, total)))
                    eta = f"{eta} (run {run_eta})"
                speed = f"  {batch_size * get_world_size() / max(iter_time, 1e-9):.1f} img/s" if batch_size else ""
                mem = ""
                if torch.cuda.is_available():
                    mem = f"  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB"
                print(f"{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  "
                      f"time: {iter_time:.4f}{speed}{mem}")
                last, last_step = now, i
        total_time = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total, 1):.4f} s / it)")


class StepRate:
    """The seconds per step behind a progress line's ETA: an exponential moving average over
    steps (half-life ``half_life`` steps), so that one slow interval (a stalled read, a
    checkpoint) moves the ETA a little, not by its own rate. An epoch's first step also pays
    for starting the loader's workers: it is averaged on its own and counted once per epoch to
    come, not as the rate of every step."""

    def __init__(self, half_life: float = 50.0):
        self.keep_per_step = 0.5 ** (1.0 / half_life)
        self.per_step: float | None = None  # steps after an epoch's first
        self.first_step: float | None = None  # an epoch's first step, loader start-up included

    @staticmethod
    def _blend(average: float | None, value: float, weight: float) -> float:
        return value if average is None else average + weight * (value - average)

    def update(self, seconds: float, steps: int, includes_first: bool = False) -> None:
        """Records ``steps`` steps that took ``seconds`` together; ``includes_first``: the first
        of them is an epoch's first step (so far only whole first steps are measured alone: the
        first progress line of an epoch comes after its first step)."""
        if includes_first:
            self.first_step = self._blend(self.first_step, seconds / steps, 0.5)
            return
        self.per_step = self._blend(self.per_step, seconds / steps, 1.0 - self.keep_per_step ** steps)

    def seconds_for(self, steps: int, epochs: int = 0, steps_per_epoch: int = 0) -> float:
        """Seconds for ``steps`` more steps of this epoch and ``epochs`` more epochs."""
        per_step = self.per_step if self.per_step is not None else (self.first_step or 0.0)
        first = self.first_step if self.first_step is not None else per_step
        return per_step * (steps + epochs * max(steps_per_epoch - 1, 0)) + first * epochs


# one StepRate per iterable (a training run's loader, the same object every epoch); forgotten with it
_STEP_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_rate_of(iterable) -> StepRate:
    """The StepRate of this iterable, carried over its epochs; a new one for what cannot be
    weakly referenced (a list, a generator's result is fine)."""
    try:
        rate = _STEP_RATES.get(iterable)
        if rate is None:
            rate = _STEP_RATES[iterable] = StepRate()
        return rate
    except TypeError:
        return StepRate()


# ------------------------------------------------------------------------------------------------
# backward and optimizer step

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


NativeScalerWithGradNormCount = LossScaler  # the reference's name


# ------------------------------------------------------------------------------------------------
# mixed precision and compilation

def autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def mark_step_begin(compile_mode: str | None) -> None:
    """Call at the start of every training step under a CUDA-graph compile mode: tells the graph
    runner that the previous step's outputs may be overwritten."""
    if compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


# ------------------------------------------------------------------------------------------------
# a loss that is not finite

class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stops before anything more is saved."""


class LossMonitor:
    """Counts non-finite losses on the device and, only when a progress line is printed, checks the
    count (all ranks together, so they stop together) and logs the rank-averaged loss and the lr
    to TensorBoard. The training loop itself never waits for the GPU."""

    def __init__(self, metric_logger: MetricLogger, device: torch.device, epoch: int, steps_per_epoch: int,
                 args, log_writer=None, loss_tag: str = "train/loss", hint: str = "Lower --blr."):
        self.metric_logger, self.epoch, self.steps_per_epoch = metric_logger, epoch, steps_per_epoch
        self.args, self.log_writer, self.loss_tag, self.hint = args, log_writer, loss_tag, hint
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor) -> None:
        """Call every step with the loss. A detached copy is kept: under CUDA graphs the loss
        tensor itself is overwritten by the next step."""
        loss = loss.detach().clone()
        self.nonfinite_steps += (~torch.isfinite(loss)).long()
        self.metric_logger.update(loss=loss)

    def due(self, step: int) -> bool:
        """Whether --log_freq N makes this step (counted over the whole run) a TensorBoard step."""
        freq = getattr(self.args, "log_freq", None)
        return bool(freq) and (self.epoch * self.steps_per_epoch + step + 1) % freq == 0

    def epoch_1000x(self, step: int) -> int:
        # x-axis in units of 1/1000 epoch, so that curves of different batch sizes line up
        return int((step / self.steps_per_epoch + self.epoch) * 1000)

    def __call__(self, step: int, to_tensorboard: bool | None = None) -> None:
        """Checks the losses so far; writes TensorBoard at printed lines, or with --log_freq at its
        steps only (to_tensorboard=True)."""
        if to_tensorboard is None:
            to_tensorboard = not getattr(self.args, "log_freq", None)
        recorded = "loss" in self.metric_logger.meters  # not yet when every step so far was skipped
        last_loss = self.metric_logger.loss.deque[-1].double() if recorded else self.nonfinite_steps.new_zeros((), dtype=torch.float64)
        state = torch.stack([self.nonfinite_steps.double(), last_loss])
        if is_dist_avail_and_initialized():
            dist.all_reduce(state)
        bad, loss_sum = state.tolist()
        if bad > 0:
            raise NonFiniteLossError(
                f"loss is not finite (NaN or inf) at epoch {self.epoch}, step <= {step}; stopping. Nothing "
                f"was saved for this epoch, the last checkpoint in {self.args.output_dir or 'output_dir'} is "
                f"intact. {self.hint}")
        if self.log_writer is not None and recorded and to_tensorboard:
            epoch_1000x = self.epoch_1000x(step)
            self.log_writer.add_scalar(self.loss_tag, loss_sum / get_world_size(), epoch_1000x)
            self.log_writer.add_scalar('train/lr', self.metric_logger.lr.value, epoch_1000x)
            if "hidden" in self.metric_logger.meters:  # fraction of the image hidden in this batch
                self.log_writer.add_scalar('train/hidden_fraction', self.metric_logger.hidden.value, epoch_1000x)
            for name, meter in self.metric_logger.meters.items():  # a mask method's own numbers
                if name.startswith("hidden_"):
                    self.log_writer.add_scalar(f"train/{name}", float(meter.value), epoch_1000x)


def epoch_progress(data_loader, epoch: int, device: torch.device, args, log_writer=None,
                   loss_tag: str = "train/loss", hint: str = "Lower --blr."):
    """The progress logging of one training epoch, shared by every training loop: a MetricLogger
    with an lr meter, the LossMonitor that checks the losses when a line is printed, and the
    iterator over data_loader that prints. Returns (metric_logger, monitor, iterator)."""
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    monitor = LossMonitor(metric_logger, device, epoch, len(data_loader), args, log_writer,
                          loss_tag=loss_tag, hint=hint)
    last_epoch = min(args.epochs, getattr(args, "stop_epoch", None) or args.epochs)
    iterator = metric_logger.log_every(data_loader, args.print_freq, f'Epoch: [{epoch}]',
                                       batch_size=args.batch_size, on_print=monitor,
                                       epochs_after=max(last_epoch - epoch - 1, 0))
    return metric_logger, monitor, iterator
