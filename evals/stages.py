"""Launching one benchmark stage: torchrun for several GPUs, a subprocess that dies with the
benchmark (so a killed benchmark leaves no stage training on), or an in-process call; and the
stop signals passed on to it."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import run.stops as stops
from util.misc import PROGRESS, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_STOP_TIMEOUT_S = 120  # how long a stopped stage may take to finish its line and leave


def die_with_parent(parent_pid: int):
    """A preexec_fn: on Linux the stage gets SIGTERM when the benchmark process dies, even by
    SIGKILL, so a killed benchmark leaves no stage training on (and the rerun finds no second
    writer; the stage's folder lock refuses one anyway)."""
    def set_death_signal():
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return  # not Linux: the folder lock still keeps a second writer out
        if os.getppid() != parent_pid:  # the parent died before the signal was set
            os._exit(1)
    return set_death_signal


def run_stage(module: str, argv: list[str], args, inprocess) -> None:
    """One stage: torchrun for several GPUs, else a subprocess or an in-process call."""
    env = dict(os.environ)
    # the stage runs in the caller's folder, so relative paths in --pretrain-args / --seg-args mean
    # what they mean in the caller's shell; the repo is found through PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    PROGRESS.clear()  # a stop now names this stage and its checkpoint
    PROGRESS.update(stage=module, checkpoint_dir=stage_folder(argv))
    if args.num_gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.num_gpus}",
               "-m", module, *argv]
    elif args.launcher == "inprocess":
        print(f"[benchmark] {module} {shlex.join(argv)}", flush=True)
        inprocess(argv)
        return
    else:
        cmd = [sys.executable, "-m", module, *argv]
    print(f"[benchmark] {shlex.join(cmd)}", flush=True)
    process = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent(os.getpid()))
    try:
        returncode = process.wait()
    except stops.Stopped as e:  # the stage stops as it would alone: its own line, its checkpoint whole
        if process.poll() is None:
            process.send_signal(e.signum)
        try:
            process.wait(timeout=STAGE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if returncode < 0 and stops.stopping():  # the stage got the same signal (e.g. Ctrl-C's process group)
        raise stops.Stopped(stops.stopping())
    if returncode != 0:
        raise UserError(f"stage {module} failed with exit status {returncode}; fix the cause and run the "
                        f"same benchmark command again: it continues from the last finished stage")


def stage_folder(argv: list[str]) -> str | None:
    """The folder a stage writes its checkpoints to (--output_dir, or the Segmenter's --log-dir)."""
    for flag in ("--output_dir", "--log-dir"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1]
    return None
