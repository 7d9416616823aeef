"""The benchmark: pretrain in chunks of --eval-freq epochs and, after each chunk, train and score a
Segmenter on ADE20k from that checkpoint, to see how a mask method's downstream quality evolves.

    python benchmark.py --in1k-dir /datasets/imagenet --ade20k-dir data/ADEChallengeData2016 \\
        --mask-method four_channels --pretrain-epochs 800 --eval-freq 100 --num-gpus 8
    python benchmark.py compare --output-dir .          # overlay every run found: miou_vs_epochs.png
    python benchmark.py ... --mask-method blocks --pretrain-args "--block_size 4" --probe-eval --knn-eval

Outputs under --output-dir, keyed by the run's identity RUN = <method>[-cov<C>]-<model>[-stacked]-seed<S>-<digest>
(the digest covers every setting of the pretraining run: schedule, --stack and its SHA-256, --pretrain-args):
    pretrain_output/RUN/checkpoint-<epochs>.pth, config.json   one pretraining run, chunk by chunk
                        knn-<epochs>.json, probe-<epochs>-<digest>.json   its kNN and frozen-probe scores
    eval_output/RUN/<epochs>ep-seg<digest>/                     Segmenter logs, metrics.json, data.json, done.json
    results.jsonl                                               one row per finished evaluation, full config
    miou_vs_epochs.png                                          one curve per run (and Segmenter settings)
A rerun with the same flags continues its run; other flags (e.g. another --coverage-ratio) make another run.
The data is part of the identity too: config.json and each evaluation's data.json record the real path and
file list of --in1k-dir and --ade20k-dir, and a command with other data is refused before any stage runs.
Every input and flag a later stage uses (val/ for kNN, ADE20k, the stages' flags) is checked before the first.

The chunks are one pretraining run (the lr schedule spans --pretrain-epochs; each chunk resumes the
previous checkpoint with its optimizer state). Run the same command again after a crash or kill:
finished chunks and evaluations are kept and never redone or overwritten; an interrupted stage
continues from its own last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import evals.knn  # noqa: E402
import evals.probe  # noqa: E402
import main_pretrain  # noqa: E402
import run.setup as runsetup  # noqa: E402
import segmenter.train  # noqa: E402
from evals.report import (FINETUNE_RESULT, finetune_table, plot, read_finetune_results, read_results,  # noqa: E402
                          results_table)
from evals.runs import (add_stage_time, ade20k_record, append_result, check_eval_data, eval_config,  # noqa: E402
                        in1k_record, official_checkpoint, paths, pretrain_throughput, read_json_object, record_run,
                        recorded_run_data, resolve_stack, row_problem, run_config, run_id, short_digest, stack_sha256,
                        stage_times)
from evals.stages import run_stage  # noqa: E402
from mask_methods import MASK_METHODS, build_method, uses_segments  # noqa: E402
from models_mae import model_patch_size, own_model_name  # noqa: E402
from run.checkpoint import (checkpoint_epochs, find_last_checkpoint, load_checkpoint, saved_args,  # noqa: E402
                            stored_epoch)
from run.files import atomic_write_json, writable_dir  # noqa: E402
from run.flags import (add_tracking_args, check_habits, coverage_ratio_type, given_flags, parse_flags,  # noqa: E402
                       positive_int, show_defaults)
from run.slurm import add_slurm_job_args, submit  # noqa: E402
from util.misc import UserError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "benchmark.py", description="Pretraining chunks alternated with ADE20k evaluation", add_help=True,
        epilog="python benchmark.py compare --output-dir DIR [--out PNG]: the results table and one curve per "
               "run found under DIR (every results.jsonl)")
    p.add_argument("--in1k-dir", required=True, help="pretraining data: train/, val/, masks/")
    p.add_argument("--ade20k-dir", required=True, help="ADEChallengeData2016 folder")
    p.add_argument("--output-dir", default="benchmark_output")
    p.add_argument("--mask-method", default="patches", choices=MASK_METHODS)
    p.add_argument("--coverage-ratio", type=coverage_ratio_type, default=50.0)
    p.add_argument("--model", default="mae_vit_base_patch16", help="MAE model for pretraining")
    p.add_argument("--seg-backbone", default=None, help="Segmenter backbone (default: the MAE's encoder)")
    p.add_argument("--seg-decoder", default="mask_transformer", choices=["linear", "mask_transformer"])
    p.add_argument("--pretrain-epochs", type=positive_int, default=800)
    p.add_argument("--eval-freq", type=positive_int, default=100, help="evaluate every N pretraining epochs")
    p.add_argument("--eval", type=eval_type, default=-1, metavar="N|random|official",
                   help="only evaluate: the checkpoint after N epochs; 'random' (or -2): a Segmenter from a randomly "
                        "initialised encoder; 'official' (or -3): from the official MAE checkpoint of --model. "
                        "Default -1: the whole pipeline")
    p.add_argument("--stack", default="", help="start pretraining from an official MAE checkpoint: a path, "
                                               "or 'official' to download the one matching --model")
    p.add_argument("--stack-sha256", default="", help="expected SHA-256 of the downloaded --stack official file")
    p.add_argument("--seed", type=int, default=0, help="seed of both stages (part of the run's identity)")
    p.add_argument("--seg-epochs", type=int, default=64)
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--num-gpus", type=positive_int, default=1, help=">1: every stage runs with torchrun on this node")
    p.add_argument("--gpu", default=None, help="CUDA_VISIBLE_DEVICES for the stages (e.g. 0 or 2,3)")
    p.add_argument("--pretrain-args", default="", help="extra flags for main_pretrain.py, one quoted string")
    p.add_argument("--seg-args", default="", help="extra flags for segmenter.train, one quoted string")
    p.add_argument("--knn-eval", action="store_true",
                   help="after each chunk, before the Segmenter: weighted kNN top-1 of the encoder on --in1k-dir "
                        "(minutes, where a Segmenter takes hours); in results.jsonl, the table and the plot")
    p.add_argument("--knn-bank-per-class", type=positive_int, default=100,
                   help="training images per class in the kNN bank")
    p.add_argument("--knn-args", default="", help="extra flags for evals.knn (e.g. '--pool mean --batch_size 256')")
    p.add_argument("--probe-eval", action="store_true",
                   help="after each chunk, before the Segmenter: the frozen-encoder linear probe on --ade20k-dir "
                        "(evals.probe: dense features, minutes where a Segmenter takes hours); with --eval random "
                        "or official, the probe of that encoder too (the reference line of the probe panel)")
    p.add_argument("--probe-args", default="", help="extra flags for evals.probe (e.g. '--epochs 8 --batchnorm')")
    add_tracking_args(p, dashes=True)  # passed to the pretraining and Segmenter stages, one group per run
    p.add_argument("--launcher", default="subprocess", choices=["subprocess", "inprocess"],
                   help="how a one-process stage runs (inprocess: in this Python process)")
    p.add_argument("--slurm", action="store_true",
                   help="run the whole benchmark as one SLURM job on one node with --num-gpus GPUs "
                        "(requeued on preemption; it continues from the last finished stage)")
    add_slurm_job_args(p.add_argument_group("SLURM (with --slurm; default job dir: <output-dir>/slurm/<job id>)"))
    return show_defaults(p)


BASELINES = {"random": "random init", "official": "official MAE"}  # --eval random|official: method label


def eval_type(value: str):
    """--eval: epochs >= 0, -1 (the whole pipeline), or a baseline; the original segmae code's
    spellings -2 (random) and -3 (official) are accepted."""
    if value in BASELINES:
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of epochs, -1, 'random' or 'official', "
                                         f"got {value!r}") from None
    if n < -3:
        raise argparse.ArgumentTypeError(f"{n} means nothing: give epochs >= 0, -1 (the whole pipeline), 'random' "
                                         f"(or -2) or 'official' (or -3)")
    return {-2: "random", -3: "official"}.get(n, n)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("in1k_dir", "ade20k_dir", "output_dir"):
        if not getattr(args, name).strip():
            parser.error(f"--{name.replace('_', '-')} is empty: give a folder (e.g. --output-dir bench)")
    # relative paths mean what they mean in the caller's shell, whatever folder a stage runs in
    for name in ("in1k_dir", "ade20k_dir", "output_dir", "job_dir"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    args.model, note = own_model_name(args.model)  # MAE-pytorch's names
    if note:
        print(f"NOTE: {note}")
    encoder = args.model.replace("mae_", "", 1).split("_dec")[0]
    if args.seg_backbone is None:
        args.seg_backbone = encoder
    elif args.seg_backbone != encoder:
        parser.error(f"--seg-backbone {args.seg_backbone} is not the encoder of --model {args.model} ({encoder}): "
                     f"the Segmenter starts from that encoder's weights; leave --seg-backbone out")


# Flags of the stages that the benchmark sets itself: given in --pretrain-args / --seg-args they would
# make a run other than the one the benchmark names, stores and reports.
PRETRAIN_FLAGS_SET_HERE = {"data_path": "--in1k-dir", "model": "--model", "mask_method": "--mask-method",
                           "coverage_ratio": "--coverage-ratio", "epochs": "--pretrain-epochs",
                           "stop_epoch": "--eval-freq", "checkpoint_name": None, "save_freq": None,
                           "output_dir": "--output-dir", "log_dir": "--output-dir", "resume": None,
                           "stack": "--stack", "seed": "--seed", "wandb": "--wandb", "wandb_offline": "--wandb-offline",
                           "wandb_group": "--wandb-group"}
SEG_FLAGS_SET_HERE = {"dataset_dir": "--ade20k-dir", "log_dir": "--output-dir", "output_dir": "--output-dir",
                      "backbone": "--seg-backbone", "decoder": "--seg-decoder", "mae_chp": None,
                      "epochs": "--seg-epochs", "crop_size": "--crop-size", "eval_freq": None, "eval_only": None,
                      "seed": "--seed", "wandb": "--wandb", "wandb_offline": "--wandb-offline",
                      "wandb_group": "--wandb-group"}
KNN_FLAGS_SET_HERE = {"checkpoint": None, "data_path": "--in1k-dir", "bank_per_class": "--knn-bank-per-class",
                      "seed": "--seed", "out": None}
PROBE_FLAGS_SET_HERE = {"checkpoint": None, "dataset_dir": "--ade20k-dir", "backbone": "--seg-backbone",
                        "crop_size": "--crop-size", "seed": "--seed", "out": None}


class _StageArgsParser(argparse.ArgumentParser):
    """A stage's parser whose errors are raised (and reported as the benchmark's flag) instead of
    exiting."""

    def error(self, message):
        raise UserError(message)


def check_stage_args(args: argparse.Namespace) -> dict:
    """Parses and checks --pretrain-args, --seg-args and (with --knn-eval, --probe-eval) --knn-args and
    --probe-args as the stages will, before any stage runs: a typo or a conflict with the benchmark's
    own flags is found now, not after hours of pretraining. Returns the mask method's parameters as
    the pretraining stage resolves them (its flags' defaults included): what a results row shows."""
    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
    stages = [("--pretrain-args", args.pretrain_args, main_pretrain, PRETRAIN_FLAGS_SET_HERE,
               pretrain_argv(args, eval_points(args)[0], os.path.join(args.output_dir, "pretrain_output"))),
              ("--seg-args", args.seg_args, segmenter.train, SEG_FLAGS_SET_HERE, seg_argv(args, checkpoint, "eval"))]
    if args.knn_eval and args.eval == -1:
        stages.append(("--knn-args", args.knn_args, evals.knn, KNN_FLAGS_SET_HERE,
                       knn_argv(args, checkpoint, os.path.join(args.output_dir, "knn.json"))))
    if args.probe_eval and (args.eval == -1 or args.eval in BASELINES):
        stages.append(("--probe-args", args.probe_args, evals.probe, PROBE_FLAGS_SET_HERE,
                       probe_argv(args, checkpoint, os.path.join(args.output_dir, "probe.json"))))
    method_params = {}
    for option, extra, module, set_here, base in stages:  # base ends with the extra flags
        parser = _StageArgsParser(prog=module.__name__, parents=[module.get_args_parser()], add_help=False)
        try:
            extra_argv = shlex.split(extra)
            check_habits(parser, extra_argv)
            conflicts = sorted(set(given_flags(parser, extra_argv)) & set(set_here))
            if conflicts:
                names = ", ".join(f"--{c}" + (f" (use the benchmark's {set_here[c]})" if set_here[c] else "")
                                  for c in conflicts)
                raise UserError(f"sets {names}, which the benchmark sets itself")
            stage_args = parser.parse_args(base)  # the stage's whole command line, extra flags included
            module.check_args(stage_args, parser)
            if module is main_pretrain:
                method_params = build_method(stage_args).params()
            if module is evals.knn and stage_args.input_size:  # the encoder's patch is --model's
                evals.knn.check_input_size(stage_args.input_size, model_patch_size(args.model), args.model)
        except (UserError, ValueError) as e:
            raise UserError(f"{option} {extra!r}: {e}") from None
    return method_params


def check_inputs(args: argparse.Namespace) -> dict:
    """Every input a stage of this command reads, checked before the first stage runs (so that a
    flat val/ or an incomplete ADE20k is not found after hours of pretraining); returns the data
    records the run and its evaluations are tied to ({'ade20k_dir', 'in1k_dir'})."""
    data = {"ade20k_dir": ade20k_record(args.ade20k_dir)}  # every command trains a Segmenter
    if args.eval == -1:  # the whole pipeline: pretraining (and kNN) read --in1k-dir
        train = None
        if args.knn_eval:
            try:
                train = evals.knn.knn_datasets(args.in1k_dir)[0]
            except UserError as e:
                raise UserError(f"--knn-eval (kNN reads --in1k-dir's train/ and val/): {e}") from None
        data["in1k_dir"] = in1k_record(args.in1k_dir, train.samples if train is not None else None)
    return data


def eval_points(args) -> list[int]:
    """Pretraining epochs after which to evaluate: every eval_freq, and the last."""
    points = list(range(args.eval_freq, args.pretrain_epochs + 1, args.eval_freq))
    if not points or points[-1] != args.pretrain_epochs:
        points.append(args.pretrain_epochs)
    return points


def check_old_layout(args) -> None:
    """Folders of the earlier layout (pretrain_output/<method>/) are not continued silently: if the
    one for this method holds a run with this configuration, say how to move it."""
    old = os.path.join(args.output_dir, "pretrain_output", args.mask_method)
    new = paths(args)["pretrain"]
    if os.path.exists(new) or not os.path.isdir(old):
        return
    last = find_last_checkpoint(old)
    saved = saved_args(load_checkpoint(last)) if last else {}
    if not saved:
        return
    same = (saved.get("model") == args.model and saved.get("epochs") == args.pretrain_epochs
            and saved.get("seed", 0) == args.seed and (not uses_segments(args.mask_method)
                                                       or saved.get("coverage_ratio") == args.coverage_ratio))
    if same:
        raise UserError(f"{old} holds a run of this configuration in the earlier layout (one folder per method). To "
                        f"continue it, move it: {shlex.join(['mv', old, new])} (evaluations: move each eval_output/"
                        f"{args.mask_method}_<E> to {os.path.dirname(paths(args, 0)['eval'])}/<E>ep-seg"
                        f"{short_digest(eval_config(args))} if they used these Segmenter settings); or move it away "
                        f"to start afresh")
    print(f"[benchmark] note: {old} (earlier layout) holds another configuration; it is left as it is")


def latest_checkpoint(pretrain_dir: str) -> tuple[str | None, int]:
    """The newest complete pretraining checkpoint (by content) and its number of epochs done."""
    path = find_last_checkpoint(pretrain_dir)
    return (path, stored_epoch(path) + 1) if path else (None, 0)


RESUME_SAVE_FREQ = 20  # epochs between a chunk's resume points: main_pretrain.py's default


def drop_resume_checkpoints(folder: str, done: int, chunk_ends: list[int]) -> None:
    """Once ``done`` epochs are pretrained, removes the checkpoints written inside finished chunks
    only to resume them: the evaluations need the chunks' own (checkpoint-<chunk end>.pth), and a
    resume the newest, which is one of those."""
    for number, path in checkpoint_epochs(folder):
        if number < done and number not in chunk_ends:
            os.remove(path)


def pretrain_argv(args, epochs: int, out: str) -> list[str]:
    """main_pretrain.py's flags for the chunk that ends after `epochs` epochs, written into out. It
    saves every RESUME_SAVE_FREQ epochs, so that a stop inside a long chunk loses little, and after the
    chunk; the in-between files go once the chunk is done (drop_resume_checkpoints)."""
    return ["--data_path", args.in1k_dir, "--model", args.model, "--mask_method", args.mask_method,
            "--coverage_ratio", str(args.coverage_ratio), "--epochs", str(args.pretrain_epochs),
            "--stop_epoch", str(epochs), "--checkpoint_name", "epochs_done",
            "--save_freq", str(RESUME_SAVE_FREQ),
            "--seed", str(args.seed), "--output_dir", out, "--log_dir", out, *wandb_argv(args, "_"),
            *shlex.split(args.pretrain_args)]


def wandb_argv(args, sep: str) -> list[str]:
    """--wandb for a stage (its flags spelt with sep): every stage of one benchmark run in one W&B
    group, the run's id unless --wandb-group (or $WANDB_RUN_GROUP) names another."""
    if not getattr(args, "wandb", None):
        return []
    group = args.wandb_group or os.environ.get("WANDB_RUN_GROUP") or run_id(args)
    offline = [f"--wandb{sep}offline"] if args.wandb_offline else []
    return ["--wandb", args.wandb, f"--wandb{sep}group", group, *offline]


def seg_argv(args, checkpoint: str | None, eval_dir: str) -> list[str]:
    """segmenter.train's flags for the evaluation of one pretraining checkpoint (None: a randomly
    initialised encoder)."""
    start = ["--mae-chp", checkpoint] if checkpoint else []
    return ["--dataset-dir", args.ade20k_dir, "--log-dir", eval_dir, "--backbone", args.seg_backbone,
            "--decoder", args.seg_decoder, *start, "--epochs", str(args.seg_epochs),
            "--crop-size", str(args.crop_size), "--eval-freq", str(args.seg_epochs), "--seed", str(args.seed),
            *wandb_argv(args, "-"), *shlex.split(args.seg_args)]


def timed_stage(folder: str, stage: str, module: str, argv: list[str], args, inprocess) -> dict:
    """run_stage, its wall-clock added to the stage's total in folder (also when it is interrupted);
    returns the total ({'seconds', 'invocations'})."""
    start = time.time()
    try:
        run_stage(module, argv, args, inprocess)
    finally:
        total = add_stage_time(folder, stage, time.time() - start)
    return total


def pretrain_until(epochs: int, args, stack: str) -> dict:
    """Continues the pretraining run until `epochs` are done; returns the chunk's total time over
    every invocation ({'seconds', 'invocations'})."""
    p = paths(args, epochs)
    stage = f"pretrain_{epochs}"
    last, done = latest_checkpoint(p["pretrain"])
    if done >= epochs:  # done by an earlier invocation: its recorded total
        return stage_times(p["pretrain"]).get(stage, {"seconds": 0.0, "invocations": 0})
    argv = pretrain_argv(args, epochs, p["pretrain"])
    if last:
        argv += ["--resume", last]
    elif stack:
        argv += ["--stack", stack]
    total = timed_stage(p["pretrain"], stage, "main_pretrain", argv, args, main_pretrain.cli)
    if not os.path.exists(p["checkpoint"]):
        raise UserError(f"pretraining stopped without writing {p['checkpoint']}")
    drop_resume_checkpoints(p["pretrain"], epochs, eval_points(args))
    return total


def knn_argv(args, checkpoint: str, out: str) -> list[str]:
    """evals.knn's flags for the score of one pretraining checkpoint, written to out."""
    return ["--checkpoint", checkpoint, "--data_path", args.in1k_dir, "--bank_per_class", str(args.knn_bank_per_class),
            "--seed", str(args.seed), "--out", out, *shlex.split(args.knn_args)]


def knn_until(epochs: int, args) -> dict | None:
    """The kNN score of checkpoint-<epochs>.pth (computed once, kept in the run's folder)."""
    p = paths(args, epochs)
    out = os.path.join(p["pretrain"], f"knn-{epochs}.json")
    if not os.path.exists(out):
        run_stage("evals.knn", knn_argv(args, p["checkpoint"], out), args, evals.knn.cli)
    return json.load(open(out))


def probe_argv(args, checkpoint: str, out: str) -> list[str]:
    """evals.probe's flags for the frozen-encoder probe of one checkpoint ('random': the MAE init)."""
    return ["--checkpoint", checkpoint, "--dataset-dir", args.ade20k_dir, "--backbone", args.seg_backbone,
            "--crop-size", str(args.crop_size), "--seed", str(args.seed), "--out", out, *shlex.split(args.probe_args)]


def probe_until(folder: str, checkpoint: str, name: str, args) -> dict:
    """The probe score of a checkpoint, computed once per probe settings and kept in folder as
    <name>-<digest>.json (other --probe-args: another file, never a stale score)."""
    out = os.path.join(folder, f"{name}-{short_digest(probe_argv(args, 'CKPT', 'OUT'))}.json")
    if not os.path.exists(out):
        os.makedirs(folder, exist_ok=True)
        run_stage("evals.probe", probe_argv(args, checkpoint, out), args, evals.probe.cli)
    return read_json_object(out, "a probe score")


def scores_row(knn: dict | None, probe: dict | None) -> dict:
    """The cheap evaluations' columns of a results row."""
    row = {}
    if knn is not None:
        row.update(knn_top1=knn["knn_top1"], knn_time_s=knn["seconds"], knn_bank=knn["bank_size"])
    if probe is not None:
        row.update(probe_miou=probe["probe_miou"], probe_time_s=probe["seconds"], probe_epochs=probe["epochs"])
    return row


def finished_row(done_file: str) -> dict:
    """The results row a finished evaluation kept in its done.json."""
    row = read_json_object(done_file, "a finished evaluation")
    problem = row_problem(row)
    if problem:
        raise UserError(f"{done_file} is not a finished evaluation's results row ({problem}): restore it, or move "
                        f"its folder away to evaluate again")
    return row


def evaluate(epochs: int, args, data: dict, pretrain_time: dict | None = None, scores: dict | None = None,
             method_params: dict | None = None) -> dict:
    """Trains and scores a Segmenter from checkpoint-<epochs>.pth, unless that was done already.
    ``data``: check_inputs' records (the evaluation's ADE20k is checked against the one it recorded);
    ``scores``: the kNN / probe columns; ``method_params``: the mask method's resolved parameters."""
    p = paths(args, epochs)
    check_eval_data(p["eval"], data["ade20k_dir"])
    done_file = os.path.join(p["eval"], "done.json")
    if os.path.exists(done_file):
        print(f"[benchmark] evaluation after {epochs} epochs already done: {done_file}")
        row = finished_row(done_file)
        append_result(p["results"], row)  # a kill after done.json but before the row: add it now
        return row
    if not os.path.exists(p["checkpoint"]):
        raise UserError(f"no pretraining checkpoint {p['checkpoint']}: run the benchmark without --eval first "
                        f"(or check --output-dir and --mask-method)")
    check_eval_data(p["eval"], data["ade20k_dir"], record=True)
    argv = seg_argv(args, p["checkpoint"], p["eval"])
    eval_time = timed_stage(p["eval"], "segmenter", "segmenter.train", argv, args, segmenter.train.cli)
    pretrain_time = pretrain_time or {"seconds": 0.0, "invocations": 0}
    metrics = json.load(open(os.path.join(p["eval"], "metrics.json")))
    row = {"run_id": run_id(args), "eval_id": short_digest(eval_config(args)),
           "method": args.mask_method, "method_params": method_params or {},
           "coverage_ratio": run_config(args)["coverage_ratio"], "epochs": epochs,
           "mIoU": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"],
           "mean_class_accuracy": metrics["mean_class_accuracy"],
           "pretrain_time_s": round(pretrain_time["seconds"], 1),
           "eval_time_s": round(eval_time["seconds"], 1),
           "resumed": pretrain_time["invocations"] > 1 or eval_time["invocations"] > 1,
           "pretrain_img_per_sec": pretrain_throughput(p["pretrain"], epochs - args.eval_freq, epochs),
           "model": args.model, "seg_backbone": args.seg_backbone,
           "stack": args.stack, "stack_sha256": stack_sha256(args),
           "config": {**run_config(args), **eval_config(args)}, "record": runsetup.run_record(args.num_gpus),
           "data": {"in1k_dir": data.get("in1k_dir") or recorded_run_data(args), "ade20k_dir": data["ade20k_dir"]}}
    row.update(scores or {})
    append_result(p["results"], row)  # the row first (a rerun never duplicates it), then done.json:
    atomic_write_json(done_file, row, indent=1)  # the stage counts as finished only now
    return row


def evaluate_baseline(kind: str, args, data: dict) -> dict:
    """The original segmae code's reference points: a Segmenter trained from a randomly initialised
    encoder ('random', its --eval -2) or from the official MAE checkpoint of --model ('official',
    its --eval -3). A results row of its own, drawn as a reference line by compare."""
    checkpoint, sha = official_checkpoint(args) if kind == "official" else (None, "")
    rid = f"baseline-{kind}-{args.seg_backbone}" + (f"-{sha[:6]}" if sha else "")
    eval_id = short_digest(eval_config(args))
    folder = os.path.join(args.output_dir, "eval_output", rid, f"seg{eval_id}")
    results = os.path.join(args.output_dir, "results.jsonl")
    done_file = os.path.join(folder, "done.json")
    check_eval_data(folder, data["ade20k_dir"], record=not os.path.exists(done_file))
    if os.path.exists(done_file):
        print(f"[benchmark] {kind} baseline already done: {done_file}")
        row = finished_row(done_file)
        append_result(results, row)
        return row
    probe = probe_until(folder, checkpoint or evals.probe.RANDOM, "probe", args) if args.probe_eval else None
    eval_time = timed_stage(folder, "segmenter", "segmenter.train", seg_argv(args, checkpoint, folder), args,
                            segmenter.train.cli)
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    row = {"run_id": rid, "eval_id": eval_id, "baseline": kind, "method": BASELINES[kind], "coverage_ratio": None,
           "epochs": 0, "mIoU": metrics["mIoU"], "pixel_accuracy": metrics["pixel_accuracy"],
           "mean_class_accuracy": metrics["mean_class_accuracy"], "pretrain_time_s": 0.0,
           "eval_time_s": round(eval_time["seconds"], 1), "resumed": eval_time["invocations"] > 1,
           "pretrain_img_per_sec": None, "model": args.model,
           "seg_backbone": args.seg_backbone, "stack": "", "stack_sha256": "", "checkpoint_sha256": sha,
           "config": {"baseline": kind, "model": args.model, **eval_config(args)},
           "record": runsetup.run_record(args.num_gpus), "data": {"ade20k_dir": data["ade20k_dir"]},
           **scores_row(None, probe)}
    append_result(results, row)
    atomic_write_json(done_file, row, indent=1)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    runsetup.check_gpu_count("--num-gpus", args.num_gpus, args.gpu)  # one rank per GPU, never CPU ranks
    for d, what in ((args.in1k_dir, "--in1k-dir"), (args.ade20k_dir, "--ade20k-dir")):
        if not os.path.isdir(d):
            raise UserError(f"{what} {d} does not exist")
    writable_dir(args.output_dir, "--output-dir")
    method_params = check_stage_args(args)
    data = check_inputs(args)
    stack = resolve_stack(args)  # its SHA-256 is part of the run's identity
    if args.eval in BASELINES:
        evaluate_baseline(args.eval, args, data)
        rows = read_results(args.output_dir)
        print(results_table(rows))
        print(f"plot: {plot(rows, os.path.join(args.output_dir, 'miou_vs_epochs.png'))}")
        return rows
    check_old_layout(args)
    print(f"[benchmark] run {run_id(args)}: {paths(args)['pretrain']}")
    if args.eval >= 0:
        evaluate(args.eval, args, data, method_params=method_params)
    else:
        for epochs in eval_points(args):  # every evaluation's data against what it recorded, before any stage
            check_eval_data(paths(args, epochs)["eval"], data["ade20k_dir"])
        record_run(args, data["in1k_dir"])  # and the run's (recorded here when the run starts)
        for epochs in eval_points(args):
            pretrain_time = pretrain_until(epochs, args, stack)
            p = paths(args, epochs)
            knn = knn_until(epochs, args) if args.knn_eval else None
            probe = probe_until(p["pretrain"], p["checkpoint"], f"probe-{epochs}", args) if args.probe_eval else None
            evaluate(epochs, args, data, pretrain_time, scores_row(knn, probe), method_params)
    rows = read_results(args.output_dir)
    print(results_table(rows))
    print(f"plot: {plot(rows, os.path.join(args.output_dir, 'miou_vs_epochs.png'))}")
    return rows


def compare_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser("benchmark.py compare: overlay every run's mIoU curve")
    p.add_argument("--output-dir", required=True, help="searched recursively for results.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: <output-dir>/miou_vs_epochs.png)")
    a = parse_flags(p, argv)
    rows = read_results(a.output_dir)
    finetuned = read_finetune_results(a.output_dir)
    if not rows and not finetuned:
        raise SystemExit(f"no results.jsonl (benchmark) or {FINETUNE_RESULT} (finetuning) under {a.output_dir}")
    if rows:
        print(results_table(rows))
        print(f"plot: {plot(rows, a.out or os.path.join(a.output_dir, 'miou_vs_epochs.png'))}")
    if finetuned:
        print(finetune_table(finetuned))


def cli(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare_cli(argv[1:])
    return runsetup.run_cli(get_args_parser(), check_args, run_or_submit, argv)


def run_or_submit(args: argparse.Namespace):
    if not args.slurm:
        return run(args)
    args.nodes, args.ngpus, args.cluster = 1, args.num_gpus, None
    args.job_dir = args.job_dir or os.path.join(os.path.abspath(args.output_dir), "slurm", "%j")
    args.log_dir = ""  # not a trainer: no log_dir
    args.dist_url = "env://"
    args.resume = ""
    return submit(run, args, name="mae_benchmark", tasks_per_node=1)


if __name__ == "__main__":
    cli()
