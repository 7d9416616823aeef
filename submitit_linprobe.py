"""Linear probing as a SLURM job (submitit): every flag of main_linprobe.py plus --nodes, --ngpus,
--timeout, --partition, --job_dir, --comment, --use_volta32, --cluster, --dry_run. The same as
submitit_finetune.py --linprobe. Preempted or timed-out jobs requeue and resume automatically.

    python submitit_linprobe.py --nodes 2 --ngpus 8 --job_dir /checkpoint/$USER/lp/%j \\
        --finetune pretrain/checkpoint-799.pth --model vit_base_patch16 --batch_size 512 --blr 0.1 \\
        --epochs 90 --dist_eval --data_path /datasets/imagenet
"""
import sys

import submitit_finetune
from run.setup import run_tool


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return submitit_finetune.main(["--linprobe", *[a for a in argv if a != "--linprobe"]])


if __name__ == "__main__":
    run_tool(main)
