"""SLURM jobs through submitit, for every main_*.py: the reference's flags (--nodes, --ngpus,
--timeout, --partition, --job_dir, --comment, --use_volta32), requeue on preemption or timeout, and
automatic resumption from the newest complete checkpoint in the job's output folder."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import torch


def add_slurm_job_args(parser) -> None:
    """The job's flags (time, folder, partition, ...), shared with benchmark.py --slurm."""
    parser.add_argument("--timeout", default=4320, type=int, help="Duration of the job, in minutes")
    parser.add_argument("--job_dir", "--job-dir", default="", type=str,
                        help="submitit's folder (%%j: the job id; relative paths are fine). Default: "
                             "<output_dir>/slurm/%%j. Given alone, checkpoints go there too, as in the reference")
    parser.add_argument("--partition", default="learnfair", type=str, help="Partition where to submit")
    parser.add_argument("--use_volta32", action="store_true", help="Request 32G V100 GPUs")
    parser.add_argument("--comment", default="", type=str, help="Comment to pass to scheduler")
    parser.add_argument("--dry_run", action="store_true", help="print the sbatch script and exit")


def add_slurm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--ngpus", default=8, type=int, help="Number of gpus to request on each node")
    parser.add_argument("--nodes", default=2, type=int, help="Number of nodes to request")
    parser.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                        help="submitit executor (default: slurm where sbatch exists, else local: the job runs "
                             "on this machine, for trying a submission out)")
    add_slurm_job_args(parser)
    # a preempted job loses at most one epoch
    parser.set_defaults(save_freq=1)
    return parser


def get_init_file(job_dir: str) -> Path:
    """A fresh file:// rendezvous for torch.distributed (deleted first if it exists)."""
    os.makedirs(job_dir, exist_ok=True)
    init_file = Path(job_dir) / f"{uuid.uuid4().hex}_init"
    if init_file.exists():
        os.remove(str(init_file))
    return init_file


class Trainer:
    """The callable submitit runs on every task; on preemption or timeout submitit calls
    ``checkpoint``, which requeues the same training: it resumes from the newest complete
    checkpoint in the output folder (run.checkpoint.open_resume)."""

    def __init__(self, main: Callable, args: argparse.Namespace):
        self.main, self.args = main, args

    def __call__(self):
        self._setup_distributed_env()
        return self.main(self.args)

    def checkpoint(self):
        import submitit
        self.args.dist_url = get_init_file(self.args.job_dir).as_uri()
        self.args.resume = ""  # auto-resume picks the newest complete checkpoint by content
        print("Requeuing", self.args)
        return submitit.helpers.DelayedSubmission(type(self)(self.main, self.args))

    def _setup_distributed_env(self) -> None:
        import submitit
        job_env = submitit.JobEnvironment()
        for key in ("output_dir", "log_dir"):  # (the benchmark's --output-dir is output_dir too)
            if getattr(self.args, key, None):
                setattr(self.args, key, str(getattr(self.args, key)).replace("%j", str(job_env.job_id)))
        if job_env.num_tasks > 1:
            # read by run.distributed.init_distributed_mode, as torchrun's variables
            os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                              LOCAL_RANK=str(job_env.local_rank))
        print(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}")


def resolve_job_folders(args: argparse.Namespace) -> None:
    """Absolute --job_dir / --output_dir / --log_dir (the job may start in another folder). Given
    --job_dir only, checkpoints go there (the reference's way); given --output_dir only, submitit's
    logs go to <output_dir>/slurm/%j; given neither, both go under ./output_dir. %j is the job id."""
    output_dir = getattr(args, "output_dir", None)
    default_output = output_dir in (None, "", "./output_dir")
    if not args.job_dir:
        args.job_dir = os.path.join(output_dir or "./output_dir", "slurm", "%j")
    elif default_output and output_dir is not None:
        args.output_dir = args.job_dir
    args.job_dir = os.path.abspath(args.job_dir)
    if getattr(args, "output_dir", None):
        args.output_dir = os.path.abspath(args.output_dir)
    if hasattr(args, "log_dir"):
        args.log_dir = args.output_dir if args.log_dir in (None, "", "./output_dir") else os.path.abspath(args.log_dir)


def job_python() -> str:
    """The interpreter the job runs: this one (the project's virtual environment when started
    from it), never whatever 'python' the compute node's PATH finds."""
    return shlex.quote(sys.executable)


def submit(main: Callable, args: argparse.Namespace, name: str, tasks_per_node: int | None = None):
    """Submits (or, with --dry_run, prints) the job; returns the submitit job. One task per GPU by
    default; the benchmark runs one task that starts torchrun for its stages."""
    import submitit
    resolve_job_folders(args)
    tasks = args.ngpus if tasks_per_node is None else tasks_per_node
    kwargs = {"slurm_constraint": "volta32gb"} if args.use_volta32 else {}
    if args.comment:
        kwargs["slurm_comment"] = args.comment
    cpus = 10 * args.ngpus // tasks
    params = dict(mem_gb=40 * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=tasks,
                  cpus_per_task=cpus, nodes=args.nodes, timeout_min=args.timeout)
    if args.dry_run:
        from submitit.slurm.slurm import _make_sbatch_string
        script = _make_sbatch_string(
            command=f"{job_python()} -u -m submitit.core._submit {shlex.quote(str(args.job_dir))}", folder=args.job_dir, job_name=name,
            partition=args.partition, time=args.timeout, nodes=args.nodes, ntasks_per_node=tasks,
            gpus_per_node=args.ngpus, cpus_per_task=cpus, mem=f"{40 * args.ngpus}GB", signal_delay_s=120,
            comment=args.comment or None, constraint="volta32gb" if args.use_volta32 else None)
        print(script)
        print(f"# job folder {args.job_dir}, outputs {getattr(args, 'output_dir', args.job_dir)} (%j: the job id)")
        return None
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30, cluster=args.cluster,
                                     slurm_python=job_python())
    if executor.cluster == "slurm":
        params.update(slurm_partition=args.partition, slurm_signal_delay_s=120, **kwargs)
    else:  # one machine: --ngpus processes (CPU processes without a GPU)
        params = dict(gpus_per_node=args.ngpus if torch.cuda.is_available() else 0,
                      tasks_per_node=tasks, nodes=1, timeout_min=args.timeout)
        # the local executor would create a folder named %j; name the job's folders now instead
        stamp = time.strftime("local_%Y%m%d_%H%M%S")
        for key in ("job_dir", "output_dir", "log_dir"):
            if getattr(args, key, None):
                setattr(args, key, getattr(args, key).replace("%j", stamp))
        executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30, cluster=args.cluster)
    executor.update_parameters(name=name, **params)
    args.dist_url = get_init_file(args.job_dir.split("%j")[0].rstrip("/") or os.getcwd()).as_uri()
    # the job unpickles this repository's code wherever it starts (sbatch and the local executor
    # pass the environment on)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    job = executor.submit(Trainer(main, args))
    resolved = lambda path: str(path).replace("%j", str(job.job_id))  # noqa: E731
    print(f"Submitted job {job.job_id}: submitit logs in {resolved(args.job_dir)}, checkpoints and logs in "
          f"{resolved(getattr(args, 'output_dir', '') or args.job_dir)}")
    return job
