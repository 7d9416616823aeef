"""What a new user reads and keeps of a run beside the checkpoints: the progress line's rates and
ETA, the files a failed or refused command leaves behind, and the experiment tracking (TensorBoard,
W&B)."""
import os
import re

import pytest

from util import misc


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class TimedLoader:
    """An epoch of len(seconds) steps, step i taking seconds[i] (the clock moves as it is read)."""

    def __init__(self, clock: FakeClock, seconds: list[float]):
        self.clock, self.seconds = clock, seconds

    def __len__(self) -> int:
        return len(self.seconds)

    def __iter__(self):
        for i, s in enumerate(self.seconds):
            self.clock.now += s
            yield i


def progress_lines(capsys, loader, print_freq: int, epochs_after: int = 0, batch_size: int = 5) -> list[str]:
    for _ in misc.MetricLogger().log_every(loader, print_freq, "Epoch: [0]", batch_size=batch_size,
                                           epochs_after=epochs_after):
        pass
    return [line for line in capsys.readouterr().out.splitlines() if "img/s" in line]


def eta_seconds(line: str, which: str = "eta") -> int:
    pattern = r"eta: (\d+):(\d+):(\d+)" if which == "eta" else r"\(run (\d+):(\d+):(\d+)\)"
    h, m, s = map(int, re.search(pattern, line).groups())
    return 3600 * h + 60 * m + s


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(misc, "time", fake)
    return fake


def test_the_last_progress_line_of_an_epoch_gives_the_rate_of_the_steps_since_the_previous_line(clock, capsys):
    # 12 steps of 1 s with batch 5 and --print_freq 6: lines at steps 0, 6 and 11 (5 steps after 6)
    lines = progress_lines(capsys, TimedLoader(clock, [1.0] * 12), print_freq=6)
    assert len(lines) == 3
    for line in lines:
        assert "time: 1.0000" in line and "5.0 img/s" in line, line


def test_the_eta_comes_from_a_smoothed_rate_not_from_the_last_interval(clock, capsys):
    # 1 s steps, then one interval of 10 s steps (a stalled read), then 1 s steps again
    seconds = [1.0] * 41 + [10.0] * 10 + [1.0] * 50
    lines = progress_lines(capsys, TimedLoader(clock, seconds), print_freq=10)
    remaining = [len(seconds) - 1 - int(re.search(r"\[\s*(\d+)/", line).group(1)) for line in lines]
    etas = [eta_seconds(line) for line in lines]
    assert etas[2] == remaining[2]  # steady 1 s steps: the ETA is exact
    # the slow interval (line at step 50) moves the ETA, but by far less than 10x
    assert remaining[5] < etas[5] < 3 * remaining[5]
    assert etas[6] < etas[5]  # and it settles back
    # at a constant rate the ETA of the run (epochs to come) is exact too
    clock.now = 0.0
    constant = progress_lines(capsys, TimedLoader(clock, [2.0] * 12), print_freq=6, epochs_after=3)
    assert eta_seconds(constant[1], "run") == 2 * (5 + 3 * 12)


def test_an_epochs_slow_first_step_does_not_make_the_eta_jump(clock, capsys):
    # every epoch's first step starts the loader's workers (20 s); the others take 1 s
    loader = TimedLoader(clock, [20.0] + [1.0] * 11)
    epochs = [progress_lines(capsys, loader, print_freq=6, epochs_after=9 - e) for e in range(3)]
    run_etas = [[eta_seconds(line, "run") for line in lines] for lines in epochs]
    truth = [[(11 - step) + (9 - e) * (20 + 11) for step in (0, 6, 11)] for e in range(3)]
    # the run's ETA after the first epoch is exact, first lines included (no jump to 12 x 20 s)
    assert run_etas[1:] == truth[1:], (run_etas, truth)


def test_a_failed_start_leaves_no_folder_it_created(toy_root, tmp_path):
    import main_finetune
    import main_pretrain
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    # pretraining that fails after writing args.txt, model.txt and optimizer.txt (--stack is read last)
    out = tmp_path / "new" / "pretrain"
    with pytest.raises(SystemExit) as e:
        main_pretrain.cli(["--data_path", toy_root, "--output_dir", str(out), "--device", "cpu", "--input_size", "32",
                           "--model", "mae_vit_tiny_patch8", "--batch_size", "16", "--num_workers", "0",
                           "--stack", str(bad)])
    assert e.value.code == 1
    assert not (tmp_path / "new").exists()  # the parent it made too
    # finetuning from a checkpoint that is not there, with a separate new TensorBoard folder
    out, logs = tmp_path / "ft", tmp_path / "tb"
    with pytest.raises(SystemExit):
        main_finetune.cli(["--data_path", toy_root, "--output_dir", str(out), "--log_dir", str(logs), "--device", "cpu",
                           "--model", "vit_tiny_patch8", "--finetune", str(tmp_path / "missing.pth")])
    assert not out.exists() and not logs.exists()
    # a folder that was there keeps what it held
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main_finetune.cli(["--data_path", toy_root, "--output_dir", str(kept), "--device", "cpu",
                           "--model", "vit_tiny_patch8", "--finetune", str(tmp_path / "missing.pth")])
    assert (kept / "notes.txt").read_text() == "mine"


def test_only_a_folder_of_start_up_files_is_removed(tmp_path):
    from run.files import first_missing_folder, remove_failed_start
    assert first_missing_folder(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a")
    assert first_missing_folder(str(tmp_path)) is None
    started = tmp_path / "started"
    (started / "tb").mkdir(parents=True)
    for name in ("args.txt", "model.txt", ".lock", "tb/events.out.tfevents.1.host"):
        (started / name).write_text("x")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "args.txt").write_text("x")
    (trained / "log.txt").write_text("{}")
    assert remove_failed_start([str(started), str(trained)]) == [str(started)]
    assert not started.exists() and (trained / "log.txt").exists()


def test_a_refused_export_leaves_no_folder(tmp_path):
    import argparse

    import models_mae
    from run.checkpoint import atomic_torch_save
    from tools import export
    from util.misc import UserError
    model = models_mae.build_mae("mae_vit_tiny_patch8", img_size=(32, 32), mask_method="segments")
    path = str(tmp_path / "checkpoint-0.pth")
    args = argparse.Namespace(model="mae_vit_tiny_patch8", mask_method="segments", input_size=[32, 32])
    atomic_torch_save({"model": model.state_dict(), "epoch": 0, "args": args}, path)
    with pytest.raises(UserError, match="random patches only"):
        export.main(["--checkpoint", path, "--to", "hf-mae", "--out", str(tmp_path / "exports" / "hf-mae")])
    assert not (tmp_path / "exports").exists()
    (tmp_path / "there").mkdir()  # a folder that was there stays
    with pytest.raises(UserError, match="random patches only"):
        export.main(["--checkpoint", path, "--to", "hf-mae", "--out", str(tmp_path / "there")])
    assert os.listdir(tmp_path / "there") == []


OUTPUT_FLAG = re.compile(r"--(?:output[_-]dir|out|log[_-]dir)[ =]([^\s`\"')\\]+)")


def documented_output_folders() -> set[str]:
    """The relative output folders of the commands in the docs' code blocks, the run_*.sh scripts and
    the Makefile (perf/: the measurement reports, kept beside their scripts)."""
    import glob

    from conftest import REPO
    found = set()
    for path in [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")):
        for block in re.findall(r"```[^\n]*\n(.*?)```", open(path).read(), re.S):
            found.update(OUTPUT_FLAG.findall(block))
    for path in glob.glob(os.path.join(REPO, "run_*.sh")) + [os.path.join(REPO, "Makefile")]:
        found.update(OUTPUT_FLAG.findall(open(path).read()))
    return {f.rstrip("/") for f in found if not f.startswith(("/", "$", "~")) and f.rstrip("/") != "perf"}


def test_every_documented_output_folder_is_ignored_by_git():
    import shutil
    import subprocess

    from conftest import REPO
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    folders = documented_output_folders()
    assert {"out_lines", "export/hf-mae", "bench", "output_demo"} <= folders
    for folder in sorted(folders):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/checkpoint-0.txt"], cwd=REPO)
        assert ignored.returncode == 0, f"{folder}/ (written by a documented command) is not in .gitignore"


def test_a_benchmark_run_keeps_only_the_chunks_checkpoints(toy_root, toy_ade20k, tmp_path):
    import benchmark
    from evals.runs import paths
    parser = benchmark.get_args_parser()
    args = parser.parse_args(["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k,
                              "--output-dir", str(tmp_path / "bench"),
                              "--mask-method", "patches", "--model", "mae_vit_tiny_patch8", "--pretrain-epochs", "4",
                              "--eval-freq", "2", "--launcher", "inprocess", "--pretrain-args",
                              "--input_size 32 --batch_size 16 --warmup_epochs 0 --num_workers 0 --device cpu"])
    benchmark.check_args(args, parser)
    for epochs in (2, 4):
        benchmark.pretrain_until(epochs, args, stack="")
    folder = paths(args)["pretrain"]
    assert sorted(n for n in os.listdir(folder) if n.endswith(".pth")) == ["checkpoint-2.pth", "checkpoint-4.pth"]


def test_save_freq_zero_saves_after_the_last_epoch_only(tmp_path):
    import argparse

    import main_pretrain
    args = argparse.Namespace(output_dir=str(tmp_path), save_freq=0)
    assert [e for e in range(5) if main_pretrain.saves_checkpoint(args, e, 5)] == [4]
    args.save_freq = 2  # the reference's rule: epochs 0, 2, 4 and the last
    assert [e for e in range(6) if main_pretrain.saves_checkpoint(args, e, 6)] == [0, 2, 4, 5]


def test_loader_workers_are_capped_at_the_usable_cores_said_once(toy_root, monkeypatch, capsys):
    import warnings

    import torch

    import main_finetune
    from run.setup import run_cli
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # a one-core job (the DataLoader asks the same)

    def two_loaders(args):  # finetuning's train and val loaders, with the default --num_workers
        for _ in range(2):
            assert sum(len(b) for b in torch.utils.data.DataLoader(list(range(4)), num_workers=args.num_workers)) == 4
        return args.num_workers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        workers = run_cli(main_finetune.get_args_parser(), main_finetune.check_args, two_loaders,
                          ["--data_path", toy_root, "--model", "vit_tiny_patch8", "--device", "cpu"])
    assert workers == 1
    assert not [w for w in caught if "worker processes" in str(w.message)]
    out = capsys.readouterr().out
    assert out.count("NOTE: --num_workers 10 is more than the 1 CPU core this process can use: 1 loader worker "
                     "per rank") == 1


# ------------------------------------------------------------------------------------------------
# W&B, read back from the offline run's .wandb file (records of wandb's own protobuf schema, in
# LevelDB's log framing: 32 KiB blocks of chunks, each with a 7-byte header after the file's own)

def wandb_records(run_folder) -> list:
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2
    [path] = glob.glob(os.path.join(str(run_folder), "run-*.wandb"))
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run_read_back(folder) -> dict:
    """{'run': the run record, 'config': {key: value}, 'history': [{key: value}]} of the one
    offline W&B run under folder."""
    import glob
    import json
    import time
    [run_folder] = glob.glob(os.path.join(str(folder), "wandb", "offline-run-*"))
    records = wandb_records(run_folder)
    for _ in range(300):  # wandb's service may still be writing the file's end after finish() returned
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
        records = wandb_records(run_folder)
    out: dict = {"config": {}, "history": []}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key in [k for k in row if k.endswith("/_type")]:  # an image's fields, as one value
                tag = key[:-len("/_type")]
                row[tag] = {k[len(tag) + 1:]: row.pop(k) for k in list(row) if k.startswith(tag + "/")}
            out["history"].append(row)
    return out


def logged(history: list[dict], tag: str) -> list[tuple]:
    """(x, value) of each logged tag, x being TensorBoard's step for it."""
    return [(row.get(f"step/{tag}"), row[tag]) for row in history if tag in row]


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)


@pytest.mark.slow
def test_pretraining_logs_the_tensorboard_scalars_images_and_configuration_to_wandb(toy_root, tmp_path, offline_wandb):
    import main_pretrain
    out = tmp_path / "pre"
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                       "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
                       "--device", "cpu", "--output_dir", str(out), "--print_freq", "1", "--vis_freq", "1",
                       "--mask_method", "patches", "--wandb", "mae-sam", "--wandb_offline", "--wandb_group", "g1"])
    got = wandb_run_read_back(out)
    assert (got["run"].project, got["run"].run_group, got["run"].job_type) == ("mae-sam", "g1", "pretrain")
    config = got["config"]
    assert config["model"] == "mae_vit_tiny_patch8" and config["mask_method"] == "patches"
    assert config["batch_size"] == 16 and config["epochs"] == 1 and config["data_path"] == [toy_root]
    # two steps, a line at each: the loss at 1/1000 epochs 0 and 500, as in TensorBoard
    loss = logged(got["history"], "train/loss")
    assert [x for x, _ in loss] == [0, 500] and all(v > 0 for _, v in loss)
    assert [x for x, _ in logged(got["history"], "train/lr")] == [0, 500]
    assert [x for x, _ in logged(got["history"], "train/img_per_sec")] == [0]
    images = logged(got["history"], "train/reconstructions")
    assert [x for x, _ in images] == [0] and images[0][1]["_type"] == "image-file"
    assert (out / "wandb").is_dir()  # beside TensorBoard's files
    # TensorBoard has the same
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [x for x, _ in tb_loss] == [x for x, _ in loss]
    assert all(abs(a - b) < 1e-6 * max(1, abs(a)) for (_, a), (_, b) in zip(tb_loss, loss))


@pytest.mark.slow
def test_a_benchmark_run_is_one_wandb_group_of_its_stages(toy_root, toy_ade20k, tmp_path, offline_wandb):
    import benchmark
    import segmenter.train
    from evals.runs import paths, run_id
    parser = benchmark.get_args_parser()
    args = parser.parse_args(["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(tmp_path / "b"),
                              "--mask-method", "patches", "--model", "mae_vit_tiny_patch8", "--pretrain-epochs", "1",
                              "--eval-freq", "1", "--seg-epochs", "1", "--crop-size", "32", "--seg-decoder", "linear",
                              "--launcher", "inprocess", "--wandb", "bench", "--wandb-offline", "--pretrain-args",
                              "--input_size 32 --batch_size 16 --warmup_epochs 0 --num_workers 0 --device cpu",
                              "--seg-args", "--batch-size 8 --lr 0.01 --num-workers 0 --device cpu"])
    benchmark.check_args(args, parser)
    benchmark.pretrain_until(1, args, stack="")  # the stages as the benchmark starts them
    p = paths(args, 1)
    segmenter.train.cli(benchmark.seg_argv(args, p["checkpoint"], p["eval"]))
    pretraining, segmentation = wandb_run_read_back(p["pretrain"]), wandb_run_read_back(p["eval"])
    assert pretraining["run"].run_group == segmentation["run"].run_group == run_id(args)
    assert (pretraining["run"].job_type, segmentation["run"].job_type) == ("pretrain", "segmenter")
    assert segmentation["config"]["backbone"] == "vit_tiny_patch8" and segmentation["config"]["epochs"] == 1
    [(epoch, miou)] = logged(segmentation["history"], "val/mIoU")
    assert epoch == 0 and 0 <= miou <= 100 and logged(segmentation["history"], "train/loss")
    assert logged(pretraining["history"], "train/loss")
    # --wandb in a stage's extra flags is the benchmark's own flag
    args.pretrain_args += " --wandb other"
    with pytest.raises(misc.UserError, match="--wandb \\(use the benchmark's --wandb\\)"):
        benchmark.check_stage_args(args)


@pytest.mark.slow
def test_finetuning_and_linear_probing_log_to_wandb(toy_root, tmp_path, offline_wandb):
    import main_finetune
    import main_linprobe
    for cli, kind in ((main_finetune.cli, "finetune"), (main_linprobe.cli, "linprobe")):
        out = tmp_path / kind
        cli(["--data_path", toy_root, "--model", "vit_tiny_patch8", "--input_size", "32", "--epochs", "1",
             "--batch_size", "16", "--num_workers", "0", "--device", "cpu", "--output_dir", str(out),
             "--wandb", "ft", "--wandb_offline"])
        got = wandb_run_read_back(out)
        assert got["run"].job_type == kind and got["config"]["model"] == "vit_tiny_patch8"
        [(epoch, top1)] = logged(got["history"], "val/acc1")
        assert epoch == 0 and 0 <= top1 <= 100 and logged(got["history"], "train/loss")


def pretrain_argv(toy_root, out, *extra) -> list[str]:
    return ["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32", "--batch_size", "16",
            "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(out),
            "--print_freq", "1", *extra]


def test_wandb_without_the_package_is_one_line_before_anything_runs(toy_root, tmp_path, monkeypatch, capsys):
    import importlib.util

    import main_pretrain
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        main_pretrain.cli(pretrain_argv(toy_root, tmp_path / "out", "--wandb", "p"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--wandb needs the wandb package, which is not installed: pip install wandb")
    assert not (tmp_path / "out").exists()


def test_every_command_runs_without_the_wandb_package():
    import subprocess
    import sys

    from conftest import REPO

    # sys.modules['wandb'] = None: `import wandb` raises ImportError, as where it is not installed
    code = ("import sys, argparse; sys.modules['wandb'] = None; "
            "import main_pretrain, main_finetune, main_linprobe, benchmark, segmenter.train; "
            "from run.tracking import tracking_writer; "
            "assert tracking_writer(argparse.Namespace(log_dir=None, output_dir='', wandb=None), 'pretrain') is None")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_wandb_failures_warn_once_and_training_goes_on(toy_root, tmp_path, monkeypatch, offline_wandb, capsys):
    import wandb

    import main_pretrain

    def unreachable(*args, **kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", unreachable)
    main_pretrain.cli(pretrain_argv(toy_root, tmp_path / "a", "--wandb", "p"))
    err = capsys.readouterr().err
    assert err.count("WARNING: W&B could not start a run in project p (could not reach api.wandb.ai): W&B logging "
                     "is off for this run") == 1
    assert (tmp_path / "a" / "checkpoint-0.pth").exists()
    monkeypatch.setattr(wandb, "init", real_init)
    # a W&B write that fails mid-run (its service gone): one warning, TensorBoard keeps every point
    from wandb.sdk.wandb_run import Run
    real_log, calls = Run.log, []

    def log_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(32, "Broken pipe")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(Run, "log", log_then_fail)
    main_pretrain.cli(pretrain_argv(toy_root, tmp_path / "b", "--wandb", "p", "--wandb_offline"))
    err = capsys.readouterr().err
    assert err.count("WARNING: W&B could not write to") == 1 and "(Broken pipe)" in err and "Traceback" not in err
    assert len(calls) == 2  # nothing more was tried after the failure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "b"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 500]
    assert (tmp_path / "b" / "checkpoint-0.pth").exists()
