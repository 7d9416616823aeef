"""Finetuning (or, with --linprobe, linear probing) as a SLURM job (submitit): every flag of
main_finetune.py / main_linprobe.py plus --nodes, --ngpus, --timeout, --partition, --job_dir,
--comment, --use_volta32. Preempted or timed-out jobs requeue and resume automatically.

    python submitit_finetune.py --nodes 4 --ngpus 8 --job_dir /checkpoint/$USER/ft/%j \\
        --finetune pretrain/checkpoint-799.pth --model vit_base_patch16 --batch_size 32 --blr 5e-4 \\
        --layer_decay 0.65 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval \\
        --data_path /datasets/imagenet
"""
import argparse
import sys

import main_finetune
import main_linprobe
from run.flags import parse_flags
from run.setup import run_tool
from run.slurm import add_slurm_args, submit


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    linprobe = "--linprobe" in argv
    if linprobe:
        argv.remove("--linprobe")
    script = main_linprobe if linprobe else main_finetune
    parser = argparse.ArgumentParser("Submitit for MAE " + ("linear probing" if linprobe else "finetuning"),
                                     parents=[script.get_args_parser()])
    parser.add_argument("--linprobe", action="store_true",
                        help="linear probing (main_linprobe.py's flags and defaults) instead of finetuning; "
                             "submitit_linprobe.py does the same")
    add_slurm_args(parser)
    args = parse_flags(parser, argv)
    script.check_args(args, parser)
    return script, args


def main(argv=None):
    script, args = parse_args(argv)
    main_finetune.check_before_submitting(args, f"{script.__name__}.py")  # not after the queue wait
    return submit(script.main, args, name="mae_linprobe" if script is main_linprobe else "mae_finetune")


if __name__ == "__main__":
    run_tool(main)
