"""Command-line flags shared by the main_*.py scripts (same names and defaults as the MAE
reference), range-checked argument types so bad values fail before any data is read, and how a
command line is read: either spelling of a flag, and which flags were given (not defaulted).

Flags that belong to one concern are declared there: a mask method's by its class
(mask_methods.py), the input recipe's by inputs/transforms.py, a script's own by the script.
"""
from __future__ import annotations

import argparse
import sys

import torch

from run.distributed import DEFAULT_DIST_TIMEOUT_S

DEFAULT_DATA_TIMEOUT_S = 120  # --data_timeout: reading one file longer than this is an error naming it
OPTIMIZERS = ("adamw", "lars")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the 4th input channel of four_channels: this repo feeds v = 1 - m, the original segmae code m
MASK_CHANNELS = ("auto", "visible", "hidden")


def positive_int(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return v


def non_negative_int(value: str) -> int:
    v = int(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return v


def non_negative_float(value: str) -> float:
    v = float(value)
    if not v >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return v


def positive_float(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return v


def fraction_below_one(value: str) -> float:
    """A rate in [0, 1): drop-path, label smoothing (1 would drop every block, or leave no label)."""
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return v


def device_type(value: str) -> str:
    """A device torch knows: cpu, cuda, cuda:N, mps, ..."""
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu, cuda or cuda:N") from None
    return value


def train_subset_type(value: str) -> int | float:
    """K >= 1 (images per class) or a fraction in (0, 1)."""
    v = float(value)
    if v.is_integer() and v >= 1:
        return int(v)
    if 0 < v < 1:
        return v
    raise argparse.ArgumentTypeError(f"must be a whole number of images per class (>= 1) or a fraction in (0, 1), "
                                     f"got {value}")


def mask_ratio_type(value: str) -> float:
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): the fraction of patches dropped, got {value}")
    return v


def coverage_ratio_type(value: str) -> float:
    v = float(value)
    if not 0.0 < v <= 100.0:
        raise argparse.ArgumentTypeError(f"must be a percentage in (0, 100], got {value}")
    return v


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Batch, schedule, data, output, device and distributed flags common to every script."""
    parser.add_argument('--batch_size', default=64, type=positive_int,
                        help='Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus')
    parser.add_argument('--epochs', default=400, type=positive_int)
    parser.add_argument('--accum_iter', default=1, type=positive_int,
                        help='Accumulate gradient iterations (for increasing the effective batch size under memory constraints)')
    parser.add_argument('--input_size', default=None, type=positive_int, nargs='+',
                        help='images input size: one value (square) or two (H W), each divisible by the patch size '
                             "(default: the model's, 224; 32 128 for Union14M's text-line models)")
    add_optimizer_args(parser)
    add_data_and_output_args(parser)
    add_speed_and_distributed_args(parser)
    return parser


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """The learning-rate schedule and the optimizer."""
    parser.add_argument('--weight_decay', type=non_negative_float, default=0.05,
                        help='weight decay (default: 0.05)')
    parser.add_argument('--lr', type=non_negative_float, default=None, metavar='LR',
                        help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=non_negative_float, default=1e-3, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=non_negative_float, default=0., metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=non_negative_int, default=40, metavar='N',
                        help='epochs to warmup LR')
    # MAE-pytorch's spelling of the optimizer settings; the defaults are the reference's
    parser.add_argument('--opt', default='adamw', choices=OPTIMIZERS,
                        help='optimizer: adamw (pretraining, finetuning) or lars (linear probing, its default)')
    parser.add_argument('--opt_betas', default=None, type=float, nargs=2, metavar=('B1', 'B2'),
                        help='AdamW betas (default: 0.9 0.95 for pretraining, 0.9 0.999 for finetuning and probing)')
    parser.add_argument('--opt_eps', default=1e-8, type=positive_float, metavar='EPS', help='AdamW epsilon')


def add_data_and_output_args(parser: argparse.ArgumentParser) -> None:
    """Where the data is read from and the run is written to, loading, seeding and resuming."""
    parser.add_argument('--data_path', default=['/datasets01/imagenet_full_size/061417/'], type=str, nargs='+',
                        help='dataset path(s): each holds train/ (and masks/ for segment methods); several are concatenated')
    parser.add_argument('--output_dir', default='./output_dir',
                        help='path where to save, empty for no saving')
    parser.add_argument('--log_dir', default=None,
                        help='TensorBoard folder (default: --output_dir, so that each run keeps its own)')
    add_tracking_args(parser)
    parser.add_argument('--device', default=default_device(), type=device_type,
                        help='device to use for training / testing (default: cuda if available, else cpu)')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', default='',
                        help='resume from checkpoint')
    parser.add_argument('--start_epoch', default=0, type=non_negative_int, metavar='N',
                        help='start epoch')
    parser.add_argument('--num_workers', default=10, type=non_negative_int,
                        help='loader worker processes per rank, started once for the whole run')
    parser.add_argument('--prefetch_factor', default=4, type=positive_int,
                        help='batches each loader worker keeps ready (default: %(default)s)')
    parser.add_argument('--pin_mem', action='store_true',
                        help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    parser.add_argument('--print_freq', default=20, type=positive_int, help='print progress every N iterations')
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                        help='do not continue from the newest checkpoint in --output_dir when --resume is not given')
    parser.add_argument('--keep_last', default=0, type=non_negative_int, metavar='K',
                        help='keep only the newest K checkpoint-<epoch>.pth files (0: keep all)')
    parser.add_argument('--accept_batch_change', action='store_true',
                        help='resume with another effective batch (ranks x --batch_size x --accum_iter) than the '
                             'checkpoint trained with; the lr then follows --blr (or --lr) from the resumed epoch on')


def add_tracking_args(parser: argparse.ArgumentParser, dashes: bool = False) -> None:
    """--wandb PROJECT, --wandb_offline, --wandb_group (spelt with '-' where the command's own
    flags are)."""
    sep = "-" if dashes else "_"
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log to Weights & Biases, into this project (the same scalars and images as "
                             "TensorBoard, and the whole configuration; needs `pip install wandb`)")
    parser.add_argument(f"--wandb{sep}offline", action="store_true",
                        help="--wandb without network: the run is kept under --log_dir's wandb/ (or $WANDB_DIR), "
                             "for `wandb sync` later")
    parser.add_argument(f"--wandb{sep}group", default=None, metavar="GROUP",
                        help="the W&B run group (default: $WANDB_RUN_GROUP; the benchmark gives its stages one "
                             "group per benchmark run)")


def add_speed_and_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Mixed precision, compilation, and the distributed set-up and its timeouts."""
    parser.add_argument('--amp', default=None, choices=['bf16', 'fp16', 'none'],
                        help='mixed precision (default: bf16 on GPUs that support it, else none)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                        help='torch.compile mode (a mode other than default implies --compile); reduce-overhead also uses CUDA graphs')

    # distributed training parameters
    parser.add_argument('--world_size', default=1, type=int,
                        help='number of distributed processes')
    add_local_rank_arg(parser)
    parser.add_argument('--dist_on_itp', action='store_true')
    parser.add_argument('--dist_url', default='env://',
                        help='url used to set up distributed training')
    parser.add_argument('--dist_timeout', default=DEFAULT_DIST_TIMEOUT_S, type=positive_int, metavar='SECONDS',
                        help='a collective that waits longer (a stuck or dead rank) stops every rank with an error')
    parser.add_argument('--data_timeout', default=DEFAULT_DATA_TIMEOUT_S, type=non_negative_float, metavar='SECONDS',
                        help='reading one image or mask file longer than this (hung file system, FIFO) is an error '
                             'naming the file (0: no limit); keep it below --dist_timeout')


def add_local_rank_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--local_rank / --local-rank, which torch.distributed.launch (without --use-env) gives each rank its own
    value of; the rank's place is read from the environment, so the flag is accepted and otherwise unused."""
    known = {s for a in parser._actions for s in a.option_strings}
    if not known & {'--local_rank', '--local-rank'}:
        parser.add_argument('--local_rank', '--local-rank', default=-1, type=int,
                            help="this rank's index on its node, given by torch.distributed.launch (read from "
                                 "LOCAL_RANK; the same for torchrun)")
    return parser


def add_mask_channel_arg(parser: argparse.ArgumentParser, dashes: bool = False) -> argparse.ArgumentParser:
    """How to read the 4th input channel of a four_channels checkpoint."""
    parser.add_argument('--mask-channel' if dashes else '--mask_channel', default='auto', dest='mask_channel',
                        choices=MASK_CHANNELS,
                        help='meaning of a four_channels checkpoint\'s 4th input channel: visible = v = 1 - m '
                             '(this repo), hidden = m (the original segmae code; converted exactly on load); '
                             'auto = read from the checkpoint')
    return parser


def add_downstream_args(parser: argparse.ArgumentParser, mask_methods: list[str]) -> argparse.ArgumentParser:
    """Flags shared by finetuning and linear probing: which checkpoint, how to adapt it, evaluation."""
    parser.add_argument('--train_subset', default=None, type=train_subset_type, metavar='K',
                        help='train on K images per class (or a fraction of each class), drawn with --seed; '
                             'the list is written to <output_dir>/train_subset.txt (label-efficiency sweeps)')
    parser.add_argument('--finetune', default='',
                        help='finetune from checkpoint (a pretraining checkpoint of any mask method, or an official MAE one)')
    parser.add_argument('--global_pool', action='store_true')
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='Use class token instead of global pool for classification')
    parser.add_argument('--nb_classes', default=1000, type=positive_int,
                        help='number of the classification types')
    parser.add_argument('--eval', action='store_true',
                        help='Perform evaluation only')
    parser.add_argument('--dist_eval', action='store_true', default=False,
                        help='Enabling distributed evaluation (recommended during training for faster monitor')
    parser.add_argument('--mask_method', default=None, choices=mask_methods,
                        help='pretraining method of --finetune; read from the checkpoint, an error if it disagrees')
    parser.add_argument('--fold_mask_channel', action='store_true',
                        help='four_channels checkpoints: fold the constant-1 visibility channel into a '
                             '3-channel patch embedding (default)')
    parser.add_argument('--no_fold_mask_channel', action='store_false', dest='fold_mask_channel',
                        help='keep the 4-channel patch embedding and feed it a constant-1 fourth channel')
    parser.set_defaults(fold_mask_channel=True)
    add_mask_channel_arg(parser)
    parser.add_argument('--save_freq', default=1, type=positive_int,
                        help='save a checkpoint every N epochs (and after the last); the best one is '
                             'also kept as checkpoint-best.pth')
    return parser


def check_model_and_input_size(args: argparse.Namespace, parser: argparse.ArgumentParser,
                               patch_size_of, default_input_size=None, own_name=None) -> None:
    """--model must be registered and each side of --input_size divisible by its patch size; no
    --input_size means the model's default. ``own_name(name) -> (name, note)``: another codebase's
    name for a registered model, taken with the note printed."""
    if own_name is not None:
        args.model, note = own_name(args.model)
        if note:
            print(f"NOTE: {note}")
    try:
        patch = patch_size_of(args.model)
    except ValueError as e:
        parser.error(str(e))
    if args.input_size is None:
        args.input_size = default_input_size(args.model) if default_input_size else [224]
    if len(args.input_size) > 2:
        parser.error(f"--input_size takes one or two integers (H W), got {args.input_size}")
    h, w = args.input_size[0], args.input_size[-1]
    if h % patch or w % patch:
        parser.error(f"--input_size {h} {w} is not divisible by the patch size {patch} of {args.model}")
    problem = too_many_tokens(h, w, patch)
    if problem:
        parser.error(f"--input_size {h} {w}: {problem}")


MAX_TOKENS = 65536  # a 256 x 256 patch grid (4096 x 4096 pixels at patch 16): beyond it, a typo, not a model


def too_many_tokens(h: int, w: int, patch: int) -> str:
    """Why an input of h x w pixels is too large for a ViT of this patch size ("" when it is not):
    its position embedding alone would take gigabytes."""
    tokens = -(-h // patch) * -(-w // patch)
    if tokens <= MAX_TOKENS:
        return ""
    side = int(MAX_TOKENS ** 0.5) * patch
    return (f"{tokens:,} patches of {patch} px, more than the {MAX_TOKENS:,} a ViT here takes (e.g. {side} x {side}); "
            f"pass a smaller size")


def check_optimizer_args(args: argparse.Namespace, parser: argparse.ArgumentParser, allowed: tuple[str, ...],
                         default_betas: tuple[float, float]) -> None:
    """--opt must be one this script trains with; --opt_betas (AdamW's) defaults to the script's."""
    if args.opt not in allowed:
        parser.error(f"--opt {args.opt} is not used by this script: choose {' or '.join(allowed)} "
                     f"(lars is linear probing's optimizer, as in the MAE reference)")
    if args.opt == "lars" and args.opt_betas is not None:
        parser.error("--opt_betas sets AdamW's betas; LARS (--opt lars) has none: leave it out or pass --opt adamw")
    if args.opt == "adamw" and args.opt_betas is None:
        args.opt_betas = list(default_betas)
    if args.opt_betas is not None and not all(0 <= b < 1 for b in args.opt_betas):
        parser.error(f"--opt_betas must be two numbers in [0, 1), got {' '.join(map(str, args.opt_betas))}")


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every flag's --help line shows its default, unless it already says it or there is none."""
    for action in parser._actions:
        if not action.option_strings or action.default in (None, "", False, argparse.SUPPRESS):
            continue
        if action.help is None:
            action.help = "(default: %(default)s)"
        elif "default" not in action.help:
            action.help += " (default: %(default)s)"
    return parser


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


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args with either spelling of every flag, and this repo's way for other codebases'
    habits (check_habits): how every command reads its command line."""
    argv = normalise_flag_spelling(parser, sys.argv[1:] if argv is None else list(argv))
    check_habits(parser, argv)
    return parser.parse_args(argv)


# What users of the original segmae code (and the MAE reference) type, with this repo's way, shown
# instead of argparse's bare error. Keys in the underscore spelling.
FOREIGN_FLAGS = {  # flags this repo does not have: (a flag of the commands where the hint holds, the hint)
    "--decoder_depth": ("--norm_pix_loss",
                        "the decoder is part of --model here: mae_vit_base_patch16 and mae_vit_large_patch16 are the "
                        "reference's mae_vit_*_dec512d8b (8 blocks of 512, the original segmae's default "
                        "--decoder_depth 8); another decoder is a registry function in models_mae.py"),
    "--local": ("--cluster", "pass --cluster local to run the job on this machine (the original segmae's --local)"),
}
VALUE_FLAGS = {  # flags that were switches there and take a value here
    "--stack": "--stack takes the checkpoint to start from: a path (the original segmae's --stack started from "
               "mae_pretrain_vit_large.pth: pass that file); benchmark.py also takes --stack official, the "
               "official MAE checkpoint of --model",
}
REQUIRED_FLAGS = {  # flags required here that were not there
    "--ade20k_dir": "the original segmae downloaded ADE20k itself; here it is prepared once with python -m "
                    "segmenter.prepare_ade20k --out data, then passed as --ade20k-dir data/ADEChallengeData2016",
}


def check_habits(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A parser error naming this repo's way where the command line holds another codebase's habit
    (FOREIGN_FLAGS, VALUE_FLAGS, REQUIRED_FLAGS); nothing otherwise (argparse then parses)."""
    actions = {s: a for a in parser._actions for s in a.option_strings}
    underscored = lambda flag: "--" + flag[2:].replace("-", "_")  # noqa: E731
    given = {t.split("=")[0] for t in argv if t.startswith("-")}
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        flag = token.split("=")[0]
        where, hint = FOREIGN_FLAGS.get(underscored(flag), (None, ""))
        if flag not in actions and where in actions:
            parser.error(f"{flag}: {hint}")
        action = actions.get(flag)
        takes_value = action is not None and action.nargs is None and action.const is None and not isinstance(
            action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
        if (takes_value and underscored(flag) in VALUE_FLAGS and "=" not in token
                and (i + 1 == len(argv) or argv[i + 1].startswith("--"))):
            parser.error(VALUE_FLAGS[underscored(flag)])
    if given & {"-h", "--help"}:
        return
    for action in parser._actions:
        if action.required and action.option_strings and not given & set(action.option_strings):
            flag = action.option_strings[0]
            if underscored(flag) in REQUIRED_FLAGS:
                parser.error(f"{flag} is required: {REQUIRED_FLAGS[underscored(flag)]}")


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
