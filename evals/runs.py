"""A benchmark run's identity, configuration and results rows.

A pretraining run's folder is named after everything that defines it, so another configuration
never continues (or reports as) this one: RUN = <method>[-cov<C>]-<model>[-stacked]-seed<S>-<digest>.
The data is part of a run's and an evaluation's identity too, but kept out of the names (runs of
earlier versions keep theirs): its real path and file list are recorded (the run's config.json, each
evaluation's data.json) and every later command is checked against them.
results.jsonl holds one row per (run, Segmenter settings, epochs), never duplicated; it is only
ever appended to, one line per write, so writers sharing the folder lose no row.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import shlex
import urllib.request

from inputs.folders import scan_image_folder
from inputs.roots import LMDB, NOT_CLASSES, SPLIT, root_kind
from inputs.shards import expand_shards, is_shard_path
from mask_methods import uses_segments
from run.checkpoint import load_checkpoint
from run.distributed import file_list_digest
from run.files import (StorageError, atomic_write_json, file_digest, free_space, read_jsonl, read_sha256_record,
                       write_sha256_record)
from segmenter import RECIPE as SEGMENTER_RECIPE
from segmenter.data import ADE20K
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


def record_run(args, in1k: dict) -> None:
    """config.json in the run's folder: the full configuration, for a person and for compare, and
    the pretraining data (``in1k``: in1k_record) the run is tied to. A run's recorded data is
    checked against this command's before anything is done: another folder, or the same folder
    with another file list, is refused (a run that recorded no data, from an earlier version, is
    checked by the path it recorded and gets the record now)."""
    folder = paths(args)["pretrain"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        atomic_write_json(path, {"run_id": run_id(args), "config": run_config(args),
                                 "in1k_dir": os.path.abspath(args.in1k_dir),
                                 "ade20k_dir": os.path.abspath(args.ade20k_dir), "data": {"in1k_dir": in1k}},
                          indent=1)
        return
    config = read_json_object(path, "the run's record")
    recorded = _data_entry(config, "in1k_dir")
    if recorded is None and isinstance(config.get("in1k_dir"), str):  # an earlier version recorded the path only
        recorded = {"path": os.path.realpath(config["in1k_dir"]), "files": None}
    if check_recorded_data(recorded, in1k, "--in1k-dir", f"the run {folder}"):
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        atomic_write_json(path, {**config, "data": {**data, "in1k_dir": in1k}}, indent=1)


def _data_entry(record: dict, flag: str):
    """record['data'][flag] (None where there is none)."""
    data = record.get("data")
    return data.get(flag) if isinstance(data, dict) else None


def recorded_run_data(args) -> dict | None:
    """The pretraining data the run recorded in its config.json (None: none recorded)."""
    path = os.path.join(paths(args)["pretrain"], "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        return config["data"]["in1k_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_json_object(path: str, what: str) -> dict:
    """A JSON file this repo wrote that must hold an object; anything else (edited by hand, or
    damaged) is one error naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} ({what}) cannot be read ({e}): restore it, or move it away to start that part "
                        f"afresh") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} ({what}) holds a {type(obj).__name__}, not a JSON object: restore it, or move it "
                        f"away to start that part afresh")
    return obj


# ------------------------------------------------------------------------------------------------
# the data a run and an evaluation are tied to: its real path and its file list (the digest the
# ranks check computes), recorded when they start and checked by every later command

def in1k_record(root: str, train_samples=None) -> dict:
    """{'path': the real path, 'files': what lists the pretraining data} of --in1k-dir: the file
    list of train/ (or of the class folders directly inside) as a count and a digest; the names and
    sizes of the files of an LMDB or of tar shards. ``train_samples``: train/'s scan, when one was
    made already (the kNN check)."""
    real = os.path.realpath(root)
    if is_shard_path(root):
        return {"path": real, "files": _names_and_sizes(expand_shards(root), root)}
    kind = root_kind(root)
    if kind == LMDB:  # its data file (lock.mdb is the readers' table, not data)
        return {"path": real, "files": _names_and_sizes([os.path.join(root, "data.mdb")], root)}
    if train_samples is None or kind != SPLIT:
        image_root, exclude = (os.path.join(root, "train"), ()) if kind == SPLIT else (root, NOT_CLASSES)
        train_samples = scan_image_folder(image_root, exclude=exclude).samples
    return {"path": real, "files": {"images": len(train_samples), "digest": train_samples.digest()[:16]}}


def _names_and_sizes(files: list[str], root: str) -> dict:
    listing = [f"{os.path.relpath(f, root)}:{os.path.getsize(f)}" for f in files]
    return {"files": len(files), "digest": file_list_digest(listing, "")}


def ade20k_record(root: str) -> dict:
    """{'path', 'files'} of --ade20k-dir: each split's image count and file-list digest (as the
    Segmenter's ranks check computes them). Opening the splits checks the layout, so a missing or
    incomplete ADE20k is found before any stage runs."""
    files = {}
    for split in ("train", "val"):
        names = ADE20K(root, split, transform=None).names
        files[split] = {"images": len(names), "digest": file_list_digest(names, "")}
    return {"path": os.path.realpath(root), "files": files}


def describe_data(record: dict) -> str:
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "its file list not recorded"
    if "train" in files:
        return ", ".join(f"{split} {v.get('images')} images, list {v.get('digest')}" for split, v in files.items()
                         if isinstance(v, dict))
    count = f"{files['images']} images" if "images" in files else f"{files.get('files')} files"
    return f"{count}, list {files.get('digest')}"


def check_recorded_data(recorded: dict | None, current: dict, flag: str, what: str) -> bool:
    """Checks the data given now (``current``) against what ``what`` recorded; returns True when
    the record should be written (none yet, or the data moved). The same real path and file list
    pass; a file list that changed, or another folder, is one error naming both and the way out;
    the same file list at a new path passes (with a note) only when the recorded folder is gone,
    i.e. the data moved (a record without a file list, from an earlier version: the path alone)."""
    if not recorded:
        return True
    if not (isinstance(recorded, dict) and isinstance(recorded.get("path"), str)):
        raise UserError(f"{what} holds a damaged record of its {flag} ({recorded!r:.80}): restore it from the results "
                        f"rows, or move that folder away to start it afresh")
    old_path, old_files = recorded.get("path"), recorded.get("files")
    same_files = old_files is None or old_files == current["files"]
    if old_path == current["path"]:
        if same_files:
            return old_files is None  # an earlier version's record: completed now
        raise UserError(f"{flag} {current['path']} changed since {what} started on it ({describe_data(recorded)} then, "
                        f"{describe_data(current)} now): its results would mix two data sets. Use another "
                        f"--output-dir for the data as it is now (or restore the files the run was made on)")
    if same_files and not os.path.exists(old_path):
        print(f"[benchmark] note: {what} was made on {old_path}, which is gone; {current['path']} holds the same file "
              f"list ({describe_data(current)}): continuing on it, as data that moved")
        return True
    raise UserError(f"{what} was made on {flag} {old_path} ({describe_data(recorded)}), not on {current['path']} "
                    f"({describe_data(current)}{'; the same file list, but another folder' if same_files else ''}): "
                    f"pass {flag} {shlex.quote(old_path)} to continue it, or use another --output-dir for a run on "
                    f"this data")


EVAL_DATA = "data.json"  # in an evaluation's folder: the ADE20k it is made on


def check_eval_data(folder: str, ade20k: dict, record: bool = False) -> None:
    """An evaluation's ADE20k (``ade20k``: ade20k_record) against the one its folder recorded
    (data.json, or the finished row in done.json). ``record``: the evaluation starts now, so the
    data is recorded if it is not yet (a finished evaluation of an earlier version, which recorded
    nothing, is left as it is)."""
    path, done = os.path.join(folder, EVAL_DATA), os.path.join(folder, "done.json")
    recorded = None
    if os.path.exists(path):
        recorded = read_json_object(path, "the evaluation's data").get("ade20k_dir")
    elif os.path.exists(done):
        recorded = _data_entry(read_json_object(done, "a finished evaluation"), "ade20k_dir")
        if recorded is None:
            return
    if check_recorded_data(recorded, ade20k, "--ade20k-dir", f"the evaluation {folder}") and \
            (record or os.path.exists(path)):  # a new evaluation, or data that moved
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(path, {"ade20k_dir": ade20k}, indent=1)


def pretrain_throughput(pretrain_dir: str, first_epoch: int, last_epoch: int) -> float | None:
    """Mean img/s of the pretraining epochs [first_epoch, last_epoch) from its log.txt."""
    log = os.path.join(pretrain_dir, "log.txt")
    if not os.path.exists(log):
        return None
    speeds = [row["train_img_per_sec"] for row in read_jsonl(log)
              if first_epoch <= row.get("epoch", -1) < last_epoch and "train_img_per_sec" in row]
    return sum(speeds) / len(speeds) if speeds else None


def append_result(results_path: str, row: dict) -> None:
    """Adds ``row`` to results.jsonl unless a row of its key is there (a rerun never duplicates
    one). Safe between processes and hosts sharing the folder: the file is never rewritten, only
    appended to, the row in one write() of one line under O_APPEND, with a POSIX lock (which NFS
    and Lustre pass on to every host) held from the duplicate check to the write. So no writer
    loses another's row, and a line that is not a row (torn by a crash, edited by hand) stays in
    the file as it is."""
    folder = os.path.dirname(os.path.abspath(results_path))
    line = (json.dumps(row) + "\n").encode()
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(results_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise StorageError(f"could not write {results_path}: {e.strerror or e}; pass a writable --output-dir") from None
    try:
        _lock(fd)
        text = _read_from(fd)
        if any(result_key(old) == result_key(row) for old in parse_results(text, results_path)):
            return
        if text and not text.endswith(b"\n"):
            line = b"\n" + line  # a line torn by a crash keeps a line of its own
        if os.write(fd, line) != len(line):
            raise OSError(errno.ENOSPC, "the row was written only in part (file system full?)")
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"could not write {results_path}: {e.strerror or e} ({free_space(folder)} there); "
                           f"the row is kept in its evaluation's folder and added by the next run") from None
    finally:
        os.close(fd)


def _lock(fd: int) -> None:
    """An exclusive POSIX lock on the whole file, released when fd is closed; a file system that
    has no locks leaves the single O_APPEND write alone to keep rows whole."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def _read_from(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_result_rows(path: str) -> list[dict]:
    """The results rows of one results.jsonl; a line that is not a row is left in the file as it
    is and out of the results, with a warning naming it."""
    try:
        with open(path, "rb") as f:
            return parse_results(f.read(), path)
    except FileNotFoundError:
        return []


def parse_results(text: bytes, path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.decode("utf-8", "replace").split("\n"), 1):  # lines as the writer ends them
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problem = "is not JSON (torn by a crash, or edited)"
        else:
            problem = row_problem(row)
            if problem is None:
                rows.append(row)
                continue
            problem = f"is not a results row ({problem})"
        print(f"WARNING: {path} line {n} {problem}: left in the file as it is, and out of the results")
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is(value, kind: type) -> bool:
    """JSON types: a float is any number; true/false are no numbers."""
    if kind is float:
        return _number(value)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def row_problem(row) -> str | None:
    """What makes ``row`` unusable as a results row (the table, the curves and the duplicate check
    read these keys), or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if "run_id" not in row and "coverage_ratio" not in row:
        return "neither 'run_id' nor 'coverage_ratio'"
    needed = [("method", str), ("epochs", int), ("mIoU", float), ("pixel_accuracy", float)]
    optional = [("run_id", str), ("eval_id", str), ("model", str), ("config", dict), ("coverage_ratio", float),
                ("knn_top1", float), ("knn_time_s", float), ("pretrain_time_s", float), ("eval_time_s", float),
                ("pretrain_img_per_sec", float), ("probe_miou", float), ("probe_time_s", float),
                ("method_params", dict)]
    names = {str: "a string", int: "a whole number", float: "a number", dict: "an object"}
    for key, kind in needed:
        if not _is(row.get(key), kind):
            return f"'{key}' is missing or not {names[kind]}"
    for key, kind in optional:
        if row.get(key) is not None and not _is(row[key], kind):
            return f"'{key}' is not {names[kind]}"
    for key in ("pretrain_args", "seg_args"):
        argv = (row.get("config") or {}).get(key)
        if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            return f"config '{key}' is not a list of strings"
    return None


def result_key(row: dict) -> tuple:
    """One row per (run, evaluation settings, epochs); rows of the earlier layout have no run id."""
    if "run_id" in row:
        return row["run_id"], row.get("eval_id"), row["epochs"]
    return row["method"], row["coverage_ratio"], row["epochs"]


def add_stage_time(folder: str, stage: str, seconds: float) -> dict:
    """Adds one invocation's wall-clock to <folder>/stage_times.json and returns the stage's total
    over every invocation: a stage resumed after an interrupt reports all the time it took. A file
    that is not a record of stage times is set aside (named in a warning), not overwritten."""
    totals = stage_times(folder, set_aside=True)
    entry = totals.setdefault(stage, {"seconds": 0.0, "invocations": 0})
    entry["seconds"] = round(entry["seconds"] + seconds, 3)
    entry["invocations"] += 1
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "stage_times.json"), totals, indent=1)
    return entry


def stage_times(folder: str, set_aside: bool = False) -> dict:
    """{stage: {'seconds', 'invocations'}} of <folder>/stage_times.json; {} when there is none. One
    that cannot be read as that (edited by hand, damaged) counts as none, with a warning; with
    ``set_aside`` it is renamed to stage_times.json.unreadable, so that nothing is lost."""
    path = os.path.join(folder, "stage_times.json")
    try:
        with open(path) as f:
            totals = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        totals, problem = None, f"cannot be read ({e})"
    else:
        problem = _stage_times_problem(totals)
    if problem is None:
        return totals
    note = ""
    if set_aside:
        os.replace(path, path + ".unreadable")
        note = f"; set aside as {path}.unreadable"
    print(f"WARNING: {path} {problem}: the stage times count from this invocation on (the table's times are "
          f"lower than the time spent){note}")
    return {}


def _stage_times_problem(totals) -> str | None:
    if not isinstance(totals, dict):
        return f"holds a JSON {type(totals).__name__}, not an object of stages"
    for stage, entry in totals.items():
        if not (isinstance(entry, dict) and _number(entry.get("seconds")) and math.isfinite(entry["seconds"])
                and entry["seconds"] >= 0 and isinstance(entry.get("invocations"), int)
                and not isinstance(entry["invocations"], bool) and entry["invocations"] >= 0):
            return f"has an entry {stage!r} that is not {{'seconds': number, 'invocations': count}}"
    return None


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
