"""MAE pretraining as a SLURM job (submitit): every flag of main_pretrain.py plus --nodes, --ngpus,
--timeout, --partition, --job_dir, --comment, --use_volta32. Preempted or timed-out jobs requeue
themselves and resume from the newest checkpoint in the job's output folder.

    python submitit_pretrain.py --nodes 8 --ngpus 8 --job_dir /checkpoint/$USER/mae/%j \\
        --model mae_vit_large_patch16 --mask_method four_channels --batch_size 64 --norm_pix_loss \\
        --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --data_path /datasets/imagenet
    python submitit_pretrain.py --dry_run ...     # print the sbatch script instead of submitting
"""
import argparse

import main_pretrain
from run.flags import parse_flags
from run.setup import run_tool
from run.slurm import add_slurm_args, submit


def parse_args(argv=None):
    parser = argparse.ArgumentParser("Submitit for MAE pretrain", parents=[main_pretrain.get_args_parser()])
    add_slurm_args(parser)
    args = parse_flags(parser, argv)
    main_pretrain.check_args(args, parser)
    return args


def main(argv=None):
    args = parse_args(argv)
    main_pretrain.check_before_submitting(args)  # not after the queue wait
    return submit(main_pretrain.main, args, name="mae_pretrain")


if __name__ == "__main__":
    run_tool(main)
