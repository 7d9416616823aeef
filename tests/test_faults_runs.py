"""Runs that stop, resume and restart: stop signals, the benchmark's paths and times, torn digest
records, legacy checkpoints, data reached through a symlink. docs/RELIABILITY.md lists them with
their outcome."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_benchmark import bench_args, run_dir
from test_faults import mounted_tmpfs, run_exit_code, seg_argv
from test_finetune import downstream
from test_pretrain_cli import common

import benchmark
import evals.runs
import main_finetune
import main_pretrain
import run.stops as stops
import segmenter.train
from conftest import REPO
from run.checkpoint import load_checkpoint
from run.files import atomic_write
from util.misc import PROGRESS

# ---- 6. SIGTERM / SIGINT: one line, 128 + signal, the checkpoint whole ----------------------------

def run_until(cmd, marker, cwd=REPO, timeout=120):
    """Starts cmd and returns (process, lines read so far) once a line containing marker is out."""
    # as from a shell: default dispositions (a pytest-xdist worker's children inherit SIGINT ignored)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)])
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(timeout) or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"{cmd[1]} did not reach {marker!r}:\n{''.join(lines[-20:])}")
    return proc, lines


def stop_and_collect(proc, lines, signum):
    proc.send_signal(signum)
    try:
        rc = proc.wait(timeout=120)
    finally:  # never leave a run behind that writes checkpoints until the disk is full
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)  # the reader thread takes the last lines
    return rc, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("program, signum", [("main_pretrain", signal.SIGTERM), ("main_finetune", signal.SIGINT),
                                             ("segmenter", signal.SIGTERM), ("benchmark", signal.SIGINT)])
def test_a_stop_signal_prints_one_line_and_resumes(program, signum, toy_root, toy_ade20k, pretrained, tmp_path):
    out = tmp_path / "out"
    if program == "main_pretrain":
        argv = ["main_pretrain.py", *common(toy_root, out, "--epochs", "60", "--save_freq", "1", "--keep_last", "2",
                                            "--print_freq", "1")]
    elif program == "main_finetune":
        argv = ["main_finetune.py", *downstream(toy_root, out, "--finetune", pretrained["patches"], "--epochs",
                                                "60", "--save_freq", "1", "--keep_last", "2", "--print_freq", "1")]
    elif program == "segmenter":
        argv = ["-m", "segmenter.train", *seg_argv(toy_ade20k, out), "--epochs", "60", "--print-freq", "1"]
    else:
        argv = ["benchmark.py", *bench_args(toy_root, toy_ade20k, out, "--pretrain-epochs", "60", "--eval-freq",
                                            "60")]
        argv[argv.index("--launcher") + 1] = "subprocess"
    marker = "Epoch: [2]" if program != "benchmark" else "Epoch: [1]"
    proc, lines = run_until([sys.executable, *argv], marker)
    rc, text = stop_and_collect(proc, lines, signum)
    name = signal.Signals(signum).name
    assert rc == 128 + signum, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    stop_lines = [line for line in text.splitlines() if f"stopped by {name}" in line]
    assert stop_lines and all("run the same command to resume" in line for line in stop_lines), text[-2000:]
    assert "at epoch" in stop_lines[0] and "newest complete checkpoint:" in stop_lines[0], stop_lines
    if program == "benchmark":  # the stage's line, then the benchmark's, naming its stage
        assert len(stop_lines) == 2 and "during its stage main_pretrain" in stop_lines[1]
    newest = stop_lines[0].split("newest complete checkpoint: ")[1].split(";")[0]
    assert load_checkpoint(newest)["epoch"] >= 0
    assert not [f for f in os.listdir(os.path.dirname(newest)) if ".tmp" in f]


def test_a_stop_during_a_checkpoint_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint-0.pth"
    torch.save({"epoch": 0}, path)
    with pytest.raises(stops.Stopped):
        with atomic_write(str(path)) as f:
            f.write(b"half a checkpoint")
            raise stops.Stopped(signal.SIGTERM)
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert os.listdir(tmp_path) == ["checkpoint-0.pth"]


def test_the_stop_line_says_where_the_loop_was():
    PROGRESS.clear()
    PROGRESS.update(header="Epoch: [3]", step=5, steps=12)
    line = stops.stop_message("main_pretrain.py", stops.Stopped(signal.SIGTERM), "out/checkpoint-2.pth")
    assert line == ("main_pretrain.py stopped by SIGTERM at epoch 3, step 5/12; newest complete checkpoint: "
                    "out/checkpoint-2.pth; run the same command to resume")
    PROGRESS.clear()


# ---- 4. the benchmark's relative paths are the caller's ------------------------------------------

@pytest.mark.slow
def test_benchmark_relative_paths_mean_the_callers_folders(toy_root, toy_ade20k, tmp_path, monkeypatch):
    # data/toy is also the name of the repo's own toy data: the user's must be the one trained on
    mine = tmp_path / "data" / "toy"
    shutil.copytree(toy_root, mine)
    shutil.copytree(toy_ade20k, tmp_path / "ade")
    monkeypatch.chdir(tmp_path)
    argv = bench_args("data/toy", "ade", "bench", "--pretrain-epochs", "1")
    argv[argv.index("--launcher") + 1] = "subprocess"
    benchmark.cli(argv)
    assert os.path.isdir(tmp_path / "bench" / "results.jsonl") is False and (tmp_path / "bench" / "results.jsonl").exists()
    assert not os.path.exists(os.path.join(REPO, "bench"))
    ckpt = load_checkpoint(str(run_dir(tmp_path / "bench") / "checkpoint-1.pth"))
    assert ckpt["args"].data_path == [str(mine)] or ckpt["args"].data_path == str(mine)


# ---- 5. a resumed benchmark totals its stages' times ----------------------------------------------

def interrupt_first_call(monkeypatch, module, attr, seconds):
    real = getattr(module, attr)
    calls = []

    def once(argv):
        calls.append(argv)
        if len(calls) == 1:
            time.sleep(seconds)
            raise stops.Stopped(signal.SIGTERM)
        return real(argv)

    monkeypatch.setattr(module, attr, once)


def test_a_resumed_benchmark_totals_its_stage_times(toy_root, toy_ade20k, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    argv = bench_args(toy_root, toy_ade20k, out, "--pretrain-epochs", "1")
    interrupt_first_call(monkeypatch, main_pretrain, "cli", 1.0)
    interrupt_first_call(monkeypatch, segmenter.train, "cli", 1.5)
    assert run_exit_code(argv, benchmark.cli) == 128 + signal.SIGTERM  # in the pretraining stage
    assert run_exit_code(argv, benchmark.cli) == 128 + signal.SIGTERM  # in the Segmenter stage
    assert "stopped by SIGTERM during its stage segmenter.train" in capsys.readouterr().err
    benchmark.cli(argv)
    [row] = [json.loads(line) for line in open(out / "results.jsonl")]
    assert row["resumed"] is True
    assert row["pretrain_time_s"] >= 1.0 and row["eval_time_s"] >= 1.5
    times = json.load(open(run_dir(out) / "stage_times.json"))
    assert times["pretrain_1"]["invocations"] == 2
    assert "1*" in capsys.readouterr().out  # the table marks the resumed row


# ---- 13. a torn .sha256 record --------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "  \n", "0123"])
def test_an_empty_sha256_record_is_written_anew(tmp_path, content, capsys):
    args = argparse.Namespace(model="mae_vit_base_patch16", output_dir=str(tmp_path), stack_sha256=None)
    url = evals.runs.OFFICIAL_MAE[args.model]
    path = tmp_path / "official" / os.path.basename(url)
    path.parent.mkdir()
    path.write_bytes(b"stand-in for the official checkpoint")
    (tmp_path / "official" / (path.name + ".sha256")).write_text(content)
    _, digest = evals.runs.official_checkpoint(args)
    assert "holds no SHA-256" in capsys.readouterr().out
    assert open(str(path) + ".sha256").read().split()[0] == digest
    path.write_bytes(b"changed")  # from now on verified again
    with pytest.raises(Exception, match="the file changed"):
        evals.runs.official_checkpoint(args)


# ---- 15. torch's legacy (non-zip) checkpoint format ------------------------------------------------

def test_legacy_format_checkpoints_load(pretrained, toy_root, tmp_path, capsys):
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(pretrained["patches"], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(str(legacy))
    assert "legacy (non-zip) format" in capsys.readouterr().out
    assert ckpt["model"].keys() == load_checkpoint(pretrained["patches"])["model"].keys()
    main_finetune.cli(downstream(toy_root, tmp_path / "ft", "--finetune", str(legacy)))
    assert (tmp_path / "ft" / "checkpoint-0.pth").exists()
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(Exception, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "garbage.pth"))


# ---- 16. the same data through a symlink -----------------------------------------------------------

def test_the_same_data_through_a_symlink_is_the_same_run(toy_root, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(toy_root, small)
    os.symlink(small, tmp_path / "smalllink")
    out = tmp_path / "o"
    main_pretrain.cli(common(str(small), out, "--epochs", "2", "--stop_epoch", "1"))
    main_pretrain.cli(common(str(tmp_path / "smalllink"), out, "--epochs", "2"))
    assert load_checkpoint(str(out / "checkpoint-1.pth"))["epoch"] == 1


# ---- 9. destinations that cannot be written ------------------------------------------------------

@pytest.fixture
def read_only_fs(tmp_path):
    """A real read-only file system (a tmpfs remounted read-only) holding an empty folder data/."""
    yield from mounted_tmpfs(tmp_path / "ro", "4m", read_only_after=lambda m: (m / "data").mkdir())


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, err
    return lines[0]


def test_unwritable_output_folders_are_one_line(toy_root, tmp_path, read_only_fs, pretrained, capsys):
    from tools import export, visualize
    assert run_exit_code(common(toy_root, read_only_fs / "run")) == 1
    assert "read-only file system" in one_error_line(capsys).lower()
    assert run_exit_code(common(toy_root, read_only_fs / "data")) == 1  # exists, but cannot be written in
    assert "read-only file system" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        from run.setup import run_tool
        run_tool(export.main, ["--checkpoint", pretrained["patches"], "--to", "encoder", "--out",
                               str(read_only_fs / "export")])
    assert "--out" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        from run.setup import run_tool
        run_tool(visualize.main, ["--data_path", toy_root, "--out", str(read_only_fs / "vis"), "--num", "1"])
    assert "--out" in one_error_line(capsys)


def test_mask_cache_on_read_only_data_is_one_line(toy_root, tmp_path, read_only_fs, capsys):
    subprocess.run(["mount", "-o", "remount,rw", str(read_only_fs)], check=True)
    shutil.copytree(toy_root, read_only_fs / "toy")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_fs)], check=True)
    result = subprocess.run([sys.executable, "tools/build_mask_cache.py", "--data_path", str(read_only_fs / "toy")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "read-only file system" in result.stderr.lower() and "mask cache folder" in result.stderr


@pytest.mark.parametrize("kind", ["dangling", "too_long"])
def test_impossible_output_paths_are_one_line(toy_root, tmp_path, kind, capsys):
    if kind == "dangling":
        out = tmp_path / "link"
        os.symlink(tmp_path / "nowhere", out)
        expected = "is a symlink to"
    else:
        out = tmp_path / ("x" * 300)
        expected = "the name is too long"
    assert run_exit_code(common(toy_root, out)) == 1
    assert expected in one_error_line(capsys)


# ---- 14. a SAM checkpoint is read weights-only ---------------------------------------------------

class _WritesAMarker:
    """Unpickling this opens (creates) a file: code that runs on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_sam_checkpoint_runs_no_code(tmp_path, monkeypatch):
    pytest.importorskip("segment_anything")
    from tools import generate_masks
    marker = tmp_path / "marker"
    crafted = tmp_path / "sam_weights.pth"
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1), "payload": _WritesAMarker(str(marker))}, crafted)
    # as torch 2.4 / 2.5 behave: a torch.load without weights_only unpickles anything
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SystemExit, match="is not a plain weights file"):
        generate_masks.build_sam_generator("sam", str(crafted), "vit_b", "cpu")
    assert not marker.exists()


# ---- 3. ranks that disagree -----------------------------------------------------------------------

PER_RANK_LAUNCHER = """
import os, sys, json
sys.path.insert(0, {repo!r})
import main_pretrain
argv = json.loads({argvs!r})[int(os.environ["RANK"])]
main_pretrain.cli(argv)
"""


@pytest.mark.slow
@pytest.mark.parametrize("differ", ["batch_size", "data"])
def test_ranks_with_different_flags_or_data_are_refused_at_start(toy_root, tmp_path, differ):
    out = tmp_path / "o"
    argv0 = common(toy_root, out, "--dist_timeout", "60")
    argv1 = list(argv0)
    if differ == "batch_size":
        argv1[argv1.index("--batch_size") + 1] = "4"
        expected = "--batch_size: rank 0 8, rank 1 4"
    else:  # rank 1's copy of the data lacks one image (another mount, another state)
        mine = tmp_path / "rank1_data"
        shutil.copytree(toy_root, mine)
        os.remove(mine / "train" / "discs" / sorted(os.listdir(mine / "train" / "discs"))[0])
        argv1[argv1.index("--data_path") + 1] = str(mine)
        expected = "images: rank 0 (32, "
    launcher = tmp_path / "launch.py"
    launcher.write_text(PER_RANK_LAUNCHER.format(repo=REPO, argvs=json.dumps([argv0, argv1])))
    start = time.time()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(launcher)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and time.time() - start < 50  # refused at start-up, not after a barrier's timeout
    text = res.stdout + res.stderr
    assert "the ranks disagree" in text and expected in text, text[-3000:]
    assert "Start every rank with the same command and the same data" in text
    assert not (out / "checkpoint-0.pth").exists()


@pytest.mark.slow
def test_a_failing_stage_names_its_exit_status(toy_root, toy_ade20k, tmp_path, capsys):
    data = tmp_path / "no_masks"
    shutil.copytree(toy_root, data)
    shutil.rmtree(data / "masks")  # the segments stage stops at start-up: no masks/
    argv = bench_args(str(data), toy_ade20k, tmp_path / "bench", "--pretrain-epochs", "1")
    argv[argv.index("--launcher") + 1] = "subprocess"
    assert run_exit_code(argv, benchmark.cli) == 1
    assert "stage main_pretrain failed with exit status 1" in capsys.readouterr().err
