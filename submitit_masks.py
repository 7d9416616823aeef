"""Mask generation (tools/generate_masks.py) as a SLURM job array through submitit: every flag of
generate_masks.py plus --array (how many array tasks share the file list), --array_parallelism,
--nodes, --ngpus, --timeout, --partition, --job_dir, --comment, --use_volta32. Array task i takes
share i of the file list and splits it between its --ngpus tasks (one GPU each); a preempted or
timed-out task requeues itself and resumes (the files it wrote are kept, the rest made).

    python submitit_masks.py --array 32 --ngpus 8 --nodes 1 --timeout 720 --job_dir /checkpoint/$USER/masks/%j \\
        --data_path /datasets/imagenet --backend sam2 --sam_checkpoint sam2.1_hiera_large.pt --sam_model hiera_large
    python submitit_masks.py --dry_run ...     # print the sbatch script instead of submitting

Every task's log shows its own images/s and ETA and those of the whole array (the ranks' shared
progress files under <data_path>/masks/.progress/).
"""
from __future__ import annotations

import argparse
import os

from run.flags import parse_flags
from run.slurm import add_slurm_job_args, job_python, resolve_job_folders
from tools import generate_masks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Submitit for generate_masks.py", parents=[generate_masks.get_args_parser(False)])
    parser.add_argument("--array", default=1, type=int, help="array tasks sharing the file list (default: 1)")
    parser.add_argument("--array_parallelism", default=256, type=int, help="array tasks running at once (default: 256)")
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs (one task each) per array task")
    parser.add_argument("--nodes", default=1, type=int, help="nodes per array task")
    parser.add_argument("--cpus_per_gpu", default=10, type=int, help="CPUs per GPU task: its decode and write workers")
    parser.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                        help="submitit executor (default: slurm where sbatch exists, else local)")
    add_slurm_job_args(parser)
    args = parse_flags(parser, argv)
    if args.array < 1:
        parser.error("--array takes a number >= 1")
    if args.shard is not None or args.shards is not None:
        parser.error("--shard / --shards are set by the array: leave them out")
    return args


class MaskTask:
    """What each array task runs: its share (shard) of the file list, split between its GPU tasks.
    On preemption or timeout submitit calls ``checkpoint``, which requeues the same share."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self, shard: int) -> dict:
        import submitit
        env = submitit.JobEnvironment()
        # torchrun's variables, read by generate_masks.shard_of_this_process and for the device
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          LOCAL_WORLD_SIZE=str(max(env.num_tasks // max(env.num_nodes, 1), 1)))
        args = argparse.Namespace(**{**vars(self.args), "shard": shard, "shards": self.args.array})
        if args.workers is None:
            args.workers = generate_masks.default_workers()
        return generate_masks.main(args=args)

    def checkpoint(self, shard: int):
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.args), shard)


def submit(args: argparse.Namespace):
    import submitit
    resolve_job_folders(args)
    args.workers = None if args.workers == generate_masks.default_workers() else args.workers  # the node's own count
    params = dict(gpus_per_node=args.ngpus, tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_gpu,
                  nodes=args.nodes, timeout_min=args.timeout, mem_gb=40 * args.ngpus)
    if args.dry_run:
        from submitit.slurm.slurm import _make_sbatch_string
        print(_make_sbatch_string(
            command=f"{job_python()} -u -m submitit.core._submit {args.job_dir}", folder=args.job_dir,
            job_name="generate_masks", partition=args.partition, time=args.timeout, nodes=args.nodes,
            ntasks_per_node=args.ngpus, gpus_per_node=args.ngpus, cpus_per_task=args.cpus_per_gpu,
            mem=f"{40 * args.ngpus}GB", signal_delay_s=120, comment=args.comment or None,
            constraint="volta32gb" if args.use_volta32 else None, map_count=args.array,
            array_parallelism=args.array_parallelism))
        print(f"# {args.array} array task(s), each {args.nodes} node(s) x {args.ngpus} GPU task(s); "
              f"job folder {args.job_dir}")
        return None
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=30, cluster=args.cluster,
                                     slurm_python=job_python())
    if executor.cluster == "slurm":
        params.update(slurm_partition=args.partition, slurm_signal_delay_s=120,
                      slurm_array_parallelism=args.array_parallelism,
                      **({"slurm_constraint": "volta32gb"} if args.use_volta32 else {}),
                      **({"slurm_comment": args.comment} if args.comment else {}))
    else:  # this machine: one task per array task, without GPUs when there are none
        params = dict(timeout_min=args.timeout, tasks_per_node=1, nodes=1)
    executor.update_parameters(name="generate_masks", **params)
    repo = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    jobs = executor.map_array(MaskTask(args), list(range(args.array)))
    print(f"Submitted {len(jobs)} array task(s), job {jobs[0].job_id.split('_')[0] if jobs else '?'}: logs in "
          f"{args.job_dir}")
    return jobs


def main(argv=None):
    return submit(parse_args(argv))


if __name__ == "__main__":
    main()
