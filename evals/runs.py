"""A benchmark run's identity, configuration and results rows.

A pretraining run's folder is named after everything that defines it, so another configuration
never continues (or reports as) this one: RUN = <method>[-cov<C>]-<model>[-stacked]-seed<S>-<digest>.
results.jsonl holds one row per (run, Segmenter settings, epochs), never duplicated.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import urllib.request

from mask_methods import uses_segments
from run.checkpoint import load_checkpoint
from run.files import atomic_write_json, file_digest, read_jsonl, read_sha256_record, write_jsonl, write_sha256_record
from segmenter import RECIPE as SEGMENTER_RECIPE
from util.misc import UserError

OFFICIAL_MAE = {  # official MAE encoders for --stack official
    "mae_vit_base_patch16": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
    "mae_vit_large_patch16": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
    "mae_vit_huge_patch14": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth",
}


def run_config(args) -> dict:
    """What defines the pretraining run (the data folders are recorded, not part of the identity)."""
    config = {"method": args.mask_method,
            "coverage_ratio": args.coverage_ratio if uses_segments(args.mask_method) else None,
            "model": args.model, "pretrain_epochs": args.pretrain_epochs, "seed": args.seed,
            "stack": args.stack, "stack_sha256": stack_sha256(args),
            "pretrain_args": shlex.split(args.pretrain_args)}
    if uses_segments(args.mask_method):  # the loss's default changed: it is part of the identity
        config["seg_loss"] = stage_flag(args.pretrain_args, "seg_loss", "pixel")
    return config


def stage_flag(stage_args: str, name: str, default: str) -> str:
    """The value of --name (either spelling, '--name v' or '--name=v') in a stage's flag string."""
    value = default
    argv = shlex.split(stage_args)
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        if flag in spellings:
            value = inline or (argv[i + 1] if i + 1 < len(argv) else value)
    return value


def eval_config(args) -> dict:
    """What defines one evaluation of a checkpoint (the Segmenter's recipe included)."""
    return {"seg_backbone": args.seg_backbone, "seg_decoder": args.seg_decoder, "seg_epochs": args.seg_epochs,
            "crop_size": args.crop_size, "seed": args.seed, "seg_args": shlex.split(args.seg_args),
            "seg_recipe": SEGMENTER_RECIPE}


def short_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]


def run_id(args) -> str:
    """e.g. four_channels-cov40-vit_base_patch16-seed0-3fa2c1 (…-stacked-… from --stack)."""
    config = run_config(args)
    parts = [args.mask_method]
    if config["coverage_ratio"] is not None:
        parts.append(f"cov{args.coverage_ratio:g}")
    parts.append(args.model.replace("mae_", "", 1))
    if args.stack:
        parts.append("stacked")
    parts += [f"seed{args.seed}", short_digest(config)]
    return "-".join(parts)


def paths(args, epochs: int | None = None) -> dict:
    rid = run_id(args)
    d = {"pretrain": os.path.join(args.output_dir, "pretrain_output", rid),
         "results": os.path.join(args.output_dir, "results.jsonl")}
    if epochs is not None:
        d["checkpoint"] = os.path.join(d["pretrain"], f"checkpoint-{epochs}.pth")
        d["eval"] = os.path.join(args.output_dir, "eval_output", rid, f"{epochs}ep-seg{short_digest(eval_config(args))}")
    return d


def record_run(args) -> None:
    """config.json in the run's folder: the full configuration, for a person and for compare."""
    folder = paths(args)["pretrain"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        atomic_write_json(path, {"run_id": run_id(args), "config": run_config(args),
                                 "in1k_dir": os.path.abspath(args.in1k_dir),
                                 "ade20k_dir": os.path.abspath(args.ade20k_dir)}, indent=1)


def pretrain_throughput(pretrain_dir: str, first_epoch: int, last_epoch: int) -> float | None:
    """Mean img/s of the pretraining epochs [first_epoch, last_epoch) from its log.txt."""
    log = os.path.join(pretrain_dir, "log.txt")
    if not os.path.exists(log):
        return None
    speeds = [row["train_img_per_sec"] for row in read_jsonl(log)
              if first_epoch <= row.get("epoch", -1) < last_epoch and "train_img_per_sec" in row]
    return sum(speeds) / len(speeds) if speeds else None


def append_result(results_path: str, row: dict) -> None:
    """One row per (method, coverage, epochs): a re-run never duplicates a row. The file is
    rewritten atomically, which also drops a line torn by a crash mid-write."""
    rows = read_jsonl(results_path)
    if any(result_key(old) == result_key(row) for old in rows):
        return
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    write_jsonl(results_path, rows + [row])


def result_key(row: dict) -> tuple:
    """One row per (run, evaluation settings, epochs); rows of the earlier layout have no run id."""
    if "run_id" in row:
        return row["run_id"], row.get("eval_id"), row["epochs"]
    return row["method"], row["coverage_ratio"], row["epochs"]


def add_stage_time(folder: str, stage: str, seconds: float) -> dict:
    """Adds one invocation's wall-clock to <folder>/stage_times.json and returns the stage's total
    over every invocation: a stage resumed after an interrupt reports all the time it took."""
    totals = stage_times(folder)
    entry = totals.setdefault(stage, {"seconds": 0.0, "invocations": 0})
    entry["seconds"] = round(entry["seconds"] + seconds, 3)
    entry["invocations"] += 1
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "stage_times.json"), totals, indent=1)
    return entry


def stage_times(folder: str) -> dict:
    path = os.path.join(folder, "stage_times.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def resolve_stack(args) -> str:
    """The --stack checkpoint's path, checked (a path that is there and loads here; the official
    one downloaded or verified against its recorded SHA-256) before any stage starts."""
    if not args.stack:
        return ""
    if args.stack != "official":
        if not os.path.isfile(args.stack):
            raise UserError(f"--stack {args.stack} does not exist")
        load_checkpoint(args.stack)  # another codebase's checkpoint is refused before any stage starts
        return os.path.abspath(args.stack)  # the flag as given stays part of the run's identity
    return official_checkpoint(args)[0]


def stack_sha256(args) -> str:
    """The SHA-256 of the --stack checkpoint (stored in every results row and part of the run's
    identity): of the file given, or the one recorded beside the official checkpoint when it was
    downloaded and verified (resolve_stack); "" without --stack."""
    if not args.stack:
        return ""
    if args.stack == "official":
        url = OFFICIAL_MAE.get(args.model, "")
        return read_sha256_record(os.path.join(args.output_dir, "official", os.path.basename(url)) + ".sha256")
    if not os.path.isfile(args.stack):
        return ""
    st = os.stat(args.stack)
    return _file_sha256(os.path.realpath(args.stack), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: a changed file is read again
    return file_digest(path, "sha256")


def official_checkpoint(args) -> tuple[str, str]:
    """The official MAE checkpoint of --model under <output-dir>/official/, and its SHA-256. It is
    downloaded once; its SHA-256 is recorded beside it (<file>.sha256) at the download and checked at
    every later use, so a file that changed is refused by name."""
    if args.model not in OFFICIAL_MAE:
        raise UserError(f"no official MAE checkpoint for --model {args.model} (there are: "
                        f"{', '.join(OFFICIAL_MAE)}); give --stack a path")
    url = OFFICIAL_MAE[args.model]
    path = os.path.join(args.output_dir, "official", os.path.basename(url))
    record = path + ".sha256"
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"[benchmark] downloading {url}")
        try:
            urllib.request.urlretrieve(url, path + ".part")
        except OSError as e:  # URLError is an OSError
            raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); without network, copy the file "
                            f"to {path} (or pass --stack PATH)") from None
        got = file_digest(path + ".part", "sha256")
        if args.stack_sha256 and got != args.stack_sha256:
            os.replace(path + ".part", path + ".bad")
            raise UserError(f"{url} downloaded with SHA-256 {got}, expected --stack-sha256 {args.stack_sha256}; "
                            f"kept as {path}.bad")
        os.replace(path + ".part", path)
        write_sha256_record(record, got, path)
        print(f"[benchmark] {path}: SHA-256 {got} (recorded in {record}; checked at every later use)")
    got = file_digest(path, "sha256")
    expected = [h for h in (args.stack_sha256, read_sha256_record(record)) if h]
    for want in expected:
        if got != want:
            raise UserError(f"{path} has SHA-256 {got}, but {want} was recorded when it was downloaded (or given as "
                            f"--stack-sha256): the file changed. Delete it (and {record}) to download it again")
    if not read_sha256_record(record):
        write_sha256_record(record, got, path)
    print(f"[benchmark] official checkpoint {path} SHA-256 {got}")
    return path, got
