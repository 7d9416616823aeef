"""A fault campaign, one test per fault: kills between writes, full disks (a real tmpfs where the
test may mount one), NaN weights, flags that would train nothing or another run, damaged files.
Each fault either leaves every result intact and correct, or stops with one line naming the problem.
docs/RELIABILITY.md lists them with their outcome."""
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_benchmark import bench_args
from test_pretrain_cli import common

import benchmark
import evals.runs
import main_finetune
import main_pretrain
import run.checkpoint as checkpoint
import run.files as files
import segmenter.train
from conftest import REPO
from sam.cache import build_mask_cache
from sam.files import MaskFileError, load_segment, mask_path_for
from util.misc import UserError


def checkpoints(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("checkpoint"))


def log_epochs(folder):
    return [row["epoch"] for row in map(json.loads, open(os.path.join(folder, "log.txt")))]


def run_exit_code(argv, cli=main_pretrain.cli):
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    return exc.value.code


# ------------------------------------------------------------------------------------------------
# data loss

def test_keep_last_never_deletes_what_the_run_wrote_beside_a_stray_file(toy_root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint-99.pth").write_text("x")  # a stray, higher-numbered file
    main_pretrain.cli(common(toy_root, out, "--epochs", "3", "--save_freq", "1", "--keep_last", "1"))
    assert checkpoints(out) == ["checkpoint-2.pth", "checkpoint-99.pth"]  # ours is kept, the stray not ours to delete
    assert torch.load(out / "checkpoint-2.pth", weights_only=True)["epoch"] == 2
    assert checkpoint.find_last_checkpoint(str(out)) == str(out / "checkpoint-2.pth")  # pruning agrees with resume


def test_keep_last_judges_age_by_stored_epoch(tmp_path):
    for name, epoch in (("checkpoint-9.pth", 1), ("checkpoint-3.pth", 5), ("checkpoint-4.pth", 6)):
        checkpoint.atomic_torch_save({"epoch": epoch}, str(tmp_path / name))
    checkpoint.prune_checkpoints(str(tmp_path), 2)
    assert checkpoints(tmp_path) == ["checkpoint-3.pth", "checkpoint-4.pth"]


class Killed(BaseException):
    """Stands in for SIGKILL at a chosen point (nothing after it runs)."""


@pytest.mark.slow
def test_benchmark_row_survives_a_kill_between_row_and_done_file(toy_root, toy_ade20k, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    argv = bench_args(toy_root, toy_ade20k, out, "--pretrain-epochs", "1")
    real = files.atomic_write_json

    def killed_at_done_json(path, *a, **k):
        if path.endswith("done.json"):
            raise Killed()
        return real(path, *a, **k)

    monkeypatch.setattr(benchmark, "atomic_write_json", killed_at_done_json)
    with pytest.raises(Killed):
        benchmark.cli(argv)
    monkeypatch.setattr(benchmark, "atomic_write_json", real)
    rows = benchmark.cli(argv)  # the rerun repeats the evaluation once and keeps one row
    assert [r["epochs"] for r in rows] == [1]
    assert len(checkpoint.read_jsonl(str(out / "results.jsonl"))) == 1

    # the old order's failure: done.json written, row lost -> the rerun restores the row
    (out / "results.jsonl").write_text('{"method": "segm')  # and a torn line from a crash mid-write
    rows = benchmark.cli(argv)
    assert [r["epochs"] for r in rows] == [1]
    assert [r["epochs"] for r in checkpoint.read_jsonl(str(out / "results.jsonl"))] == [1]


def test_finetune_best_checkpoint_survives_a_kill_between_saves(pretrained, toy_root, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    accuracies = iter([10.0, 20.0, 30.0, 40.0])

    def rising_accuracy(*a, **k):
        return {"acc1": next(accuracies), "acc5": 100.0, "loss": 1.0, "count": 8}

    monkeypatch.setattr(main_finetune, "evaluate", rising_accuracy)
    real = checkpoint.atomic_torch_save

    def killed_after_epoch_1(obj, path):
        real(obj, path)
        if path.endswith("checkpoint-1.pth"):
            raise Killed()

    monkeypatch.setattr(checkpoint, "atomic_torch_save", killed_after_epoch_1)
    argv = ["--data_path", toy_root, "--finetune", pretrained["patches"], "--model", "vit_tiny_patch8",
            "--input_size", "32", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0", "--nb_classes", "4",
            "--num_workers", "0", "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu"]
    with pytest.raises(Killed):
        main_finetune.cli(argv)
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real)
    main_finetune.cli(argv)  # rerun: already finished
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["args"].max_accuracy == 20.0


def test_full_disk_at_the_log_loses_no_row(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = checkpoint.write_jsonl
    calls = {"n": 0}

    def full_on_second_log(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise checkpoint.StorageError(f"could not write {path}: No space left on device")
        return real(path, rows)

    monkeypatch.setattr(checkpoint, "write_jsonl", full_on_second_log)
    argv = common(toy_root, out, "--epochs", "2", "--save_freq", "1")
    assert run_exit_code(argv) == 1
    monkeypatch.setattr(checkpoint, "write_jsonl", real)
    main_pretrain.cli(argv)  # resumes and redoes epoch 1
    assert log_epochs(out) == [0, 1]


@pytest.mark.slow
def test_a_killed_benchmark_takes_its_stage_with_it(toy_root, toy_ade20k, tmp_path):
    out = tmp_path / "bench"
    argv = bench_args(toy_root, toy_ade20k, out, "--pretrain-epochs", "200", "--eval-freq", "200")
    argv[argv.index("--launcher") + 1] = "subprocess"
    bench = subprocess.Popen([sys.executable, "benchmark.py", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    locks = []
    while not (locks and open(locks[0]).read()) and time.time() < deadline:
        locks = glob.glob(str(out / "pretrain_output" / "*" / ".lock"))
        time.sleep(0.1)
    lock = pathlib.Path(locks[0])
    stage_pid = int(lock.read_text().split()[1])
    bench.send_signal(signal.SIGKILL)  # the benchmark alone, not its process group
    bench.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(stage_pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{stage_pid}/stat") as f:  # a zombie has ended too
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        os.killpg(bench.pid, signal.SIGKILL)
        pytest.fail("the stage kept running after its benchmark was killed")
    os.killpg(bench.pid, signal.SIGKILL) if _group_alive(bench.pid) else None


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_second_writer_to_one_folder_is_refused(toy_root, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import run.files as c; "
        "c.lock_output_dir(sys.argv[2]); print('locked', flush=True); time.sleep(60)"), REPO, str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_exit_code(common(toy_root, out)) == 1
        err = capsys.readouterr().err
        assert f"another process (pid {holder.pid}" in err and str(out) in err
        assert not (out / "checkpoint-0.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    main_pretrain.cli(common(toy_root, out))  # the holder died: its lock died with it
    assert (out / "checkpoint-0.pth").exists()


# ------------------------------------------------------------------------------------------------
# silently wrong

def test_nonfinite_weights_are_never_checkpointed(toy_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--epochs", "2", "--save_freq", "1", "--stop_epoch", "1"))
    import util.misc as misc
    real = misc.LossScaler.__call__

    calls = {"n": 0}

    def last_step_poisons(self, loss, optimizer, **kw):  # every loss is finite, the final weights are not
        result = real(self, loss, optimizer, **kw)
        calls["n"] += 1
        if calls["n"] == 4:  # the epoch's last step (32 images, batch 8)
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(misc.LossScaler, "__call__", last_step_poisons)
    assert run_exit_code(common(toy_root, out, "--epochs", "2", "--save_freq", "1")) == 1
    err = capsys.readouterr().err
    assert "not finite" in err and "checkpoint-1.pth was not written" in err
    assert f"last good checkpoint is {out / 'checkpoint-0.pth'}" in err
    assert checkpoints(out) == ["checkpoint-0.pth"]


def test_resume_refuses_a_checkpoint_with_nan_weights(toy_root, tmp_path, capsys):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--epochs", "2", "--stop_epoch", "1"))
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    next(iter(ckpt["model"].values())).fill_(float("nan"))
    torch.save(ckpt, out / "checkpoint-0.pth")  # e.g. written by an older version
    assert run_exit_code(common(toy_root, out, "--epochs", "2")) == 1
    assert "non-finite weights" in capsys.readouterr().err


def test_skip_nonfinite_when_the_first_step_is_skipped(toy_root, tmp_path, monkeypatch):
    import models_mae
    original = models_mae.MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def nan_on_first_step(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "forward_loss", nan_on_first_step)
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--skip_nonfinite", "1", "--print_freq", "1"))
    stats = json.loads((out / "log.txt").read_text())
    assert stats["train_skipped_nonfinite_steps"] == 1 and np.isfinite(stats["train_loss"])


@pytest.mark.parametrize("flags, code, message", [
    (["--accum_iter", "5"], 1, "--accum_iter 5 is more than the 4 steps"),
    (["--mask_ratio", "0"], 2, "--mask_ratio 0"),
    (["--start_epoch", "3", "--epochs", "3"], 2, "--start_epoch 3 >= --epochs 3"),
])
def test_flags_that_train_nothing_are_refused(toy_root, tmp_path, capsys, flags, code, message):
    assert run_exit_code(common(toy_root, tmp_path / "o", *flags)) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint-0.pth").exists()


def test_rerunning_a_finished_run_says_so(toy_root, tmp_path, capsys):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out))
    capsys.readouterr()
    main_pretrain.cli(common(toy_root, out))
    assert "Already finished (1 epochs done" in capsys.readouterr().out


def test_resume_with_another_coverage_ratio_is_refused(toy_root, tmp_path, capsys):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segments", "--coverage_ratio", "40", "--epochs", "2",
                             "--stop_epoch", "1"))
    argv = common(toy_root, out, "--mask_method", "segments", "--coverage_ratio", "60", "--epochs", "2")
    assert run_exit_code(argv) == 1
    err = capsys.readouterr().err
    assert "--coverage_ratio 40.0" in err and "--coverage_ratio 60.0" in err
    # left out, the checkpoint's value is taken
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segments", "--epochs", "2"))
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["args"].coverage_ratio == 40.0


@pytest.mark.parametrize("extra, message", [
    (["--pretrain-args", "--mask_method patches"], "--mask_method (use the benchmark's --mask-method)"),
    (["--pretrain-args", "--output_dir elsewhere"], "--output_dir"),
    (["--pretrain-args", "--epochs 5"], "--epochs (use the benchmark's --pretrain-epochs)"),
    (["--pretrain-args", "--blrr 1e-3"], "unrecognized arguments: --blrr"),
    (["--pretrain-args", "--input_size 36"], "not divisible by the patch size"),
    (["--seg-args", "--log-dir x"], "--log_dir"),
    (["--seg-args", "--batchsize 8"], "unrecognized arguments: --batchsize"),
])
def test_benchmark_checks_stage_flags_before_any_stage(toy_root, toy_ade20k, tmp_path, capsys, extra, message):
    out = tmp_path / "bench"
    assert run_exit_code(bench_args(toy_root, toy_ade20k, out, *extra), benchmark.cli) == 1
    assert message in capsys.readouterr().err
    assert not (out / "pretrain_output").exists()


def test_benchmark_refuses_a_backbone_that_is_not_the_encoder(toy_root, toy_ade20k, tmp_path, capsys):
    argv = bench_args(toy_root, toy_ade20k, tmp_path, "--seg-backbone", "vit_base_patch16")
    assert run_exit_code(argv, benchmark.cli) == 2
    assert "is not the encoder of --model mae_vit_tiny_patch8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# errors that name the problem

@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 12 MB file system: writes past it fail with ENOSPC as on a full disk."""
    yield from mounted_tmpfs(tmp_path / "fs", "12m")


def mounted_tmpfs(mount, size: str, read_only_after=None):
    """Mounts a tmpfs of ``size`` at mount (skips the test where that is not allowed), optionally
    fills it with read_only_after(mount) and remounts it read-only; yields it, unmounts after."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    if read_only_after is not None:
        read_only_after(mount)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_real_full_disk_during_a_checkpoint_save(toy_root, tiny_tmpfs, capsys):
    out = tiny_tmpfs / "run"
    assert run_exit_code(common(toy_root, out)) == 1
    err = capsys.readouterr().err
    assert f"could not write {out / 'checkpoint-0.pth'}: " in err and "free there" in err and "enforce fail" not in err
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # the partial file is gone
    assert log_epochs(out) == [0]


def test_real_full_disk_for_json_writers(tiny_tmpfs):
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (12 * 2 ** 20 - 4096))
    with pytest.raises(checkpoint.StorageError, match=r"could not write .*metrics.json: No space left on device"):
        files.atomic_write_json(str(tiny_tmpfs / "metrics.json"), {"x": list(range(10000))})
    with pytest.raises(checkpoint.StorageError, match="log.txt"):
        checkpoint.append_log(str(tiny_tmpfs), {"epoch": 0, "x": "y" * 10000})


@pytest.fixture
def ade_copy(toy_ade20k, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(toy_ade20k, root)
    return root


def seg_argv(root, out):
    return ["--dataset-dir", str(root), "--log-dir", str(out), "--backbone", "vit_tiny_patch8", "--decoder", "linear",
            "--epochs", "1", "--crop-size", "32", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("split", ["training", "validation"])
def test_ade20k_label_out_of_range_names_the_file(ade_copy, tmp_path, capsys, split):
    folder = ade_copy / "annotations" / split
    name = sorted(os.listdir(folder))[0]
    original = Image.open(folder / name).copy()
    label = np.asarray(original).copy()
    label[0, 0] = 199
    Image.fromarray(label).save(folder / name)
    out = tmp_path / "seg"
    assert run_exit_code(seg_argv(ade_copy, out), segmenter.train.cli) == 1
    err = capsys.readouterr().err
    assert name in err and "class 199" in err
    if split == "validation":  # the epoch's training was saved before the evaluation failed
        assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
        original.save(folder / name)  # fixed: the rerun only evaluates
        metrics = segmenter.train.cli(seg_argv(ade_copy, out))
        assert "did not finish: running it now" in capsys.readouterr().out
        assert json.loads((out / "metrics.json").read_text())["mIoU"] == metrics["mIoU"]
        assert [r["epoch"] for r in checkpoint.read_jsonl(str(out / "log.txt"))] == [0]
        assert "mIoU" in checkpoint.read_jsonl(str(out / "log.txt"))[0]


def test_rgb_ade20k_label_is_named_as_such(ade_copy, tmp_path, capsys):
    folder = ade_copy / "annotations" / "training"
    name = sorted(os.listdir(folder))[0]
    Image.open(folder / name).convert("RGB").save(folder / name)
    assert run_exit_code(seg_argv(ade_copy, tmp_path / "seg"), segmenter.train.cli) == 1
    err = capsys.readouterr().err
    assert name in err and "3 channels" in err and "but its image is" not in err


def write_mask(path, annotations):
    path.write_text(json.dumps({"annotations": annotations}))


@pytest.mark.parametrize("annotation, message", [
    ({"area": 10, "segmentation": {"size": [4, 4], "counts": [4, -2, 14]}}, "negative run length"),
    ({"area": 10, "segmentation": {"size": [4, 4], "counts": [4, 2]}}, "add up to 6 pixels"),
    ({"area": 10, "segmentation": {"size": [4, 4], "counts": "02"}}, "add up to"),
    ({"area": 10, "segmentation": {"size": [4, 4], "counts": "0!"}}, "not part of a COCO RLE"),
    ({"area": 10, "segmentation": {"size": [0, 0], "counts": ""}}, "size [0, 0]"),
    ({"area": "NaN", "segmentation": {"size": [4, 4], "counts": [16]}}, "not a finite number"),
])
def test_invalid_masks_name_their_file(tmp_path, annotation, message):
    path = tmp_path / "m.json"
    write_mask(path, [annotation])
    with pytest.raises(MaskFileError, match=re.escape(message)) as exc:
        load_segment(str(path), 50.0, image_size=(4, 4))
    assert str(path) in str(exc.value)


@pytest.fixture
def root_copy(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    return root


def first_mask(root):
    cls = sorted(os.listdir(root / "masks"))[0]
    return root / "masks" / cls / sorted(os.listdir(root / "masks" / cls))[0]


def test_negative_rle_count_is_skipped_with_skip_bad_samples(root_copy, tmp_path):
    mask = first_mask(root_copy)
    write_mask(mask, [{"area": 10, "segmentation": {"size": [32, 32], "counts": [4, -2, 1022]}}])
    out = tmp_path / "o"
    main_pretrain.cli(common(str(root_copy), out, "--mask_method", "segments", "--skip_bad_samples"))
    assert json.loads((out / "log.txt").read_text())["train_bad_samples"] == 1
    assert mask.name in (out / "bad_samples.txt").read_text()


def test_damaged_mask_cache_is_named_on_open(root_copy, tmp_path, capsys):
    from inputs.pretrain import SegmentMaskImageFolder
    images = SegmentMaskImageFolder(str(root_copy), with_masks=True).rel_paths
    bin_path = build_mask_cache(str(root_copy), images, 50.0)
    with open(bin_path, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(bin_path) - 3)
    with pytest.raises(MaskFileError, match="truncated or from another build.*build_mask_cache.py"):
        SegmentMaskImageFolder(str(root_copy), with_masks=True, coverage_ratio=50.0)
    index = bin_path.replace(".bin", ".npz")
    with open(index, "wb") as f:
        f.write(b"garbage")
    assert run_exit_code(common(str(root_copy), tmp_path / "o", "--mask_method", "segments",
                                "--coverage_ratio", "50")) == 1
    assert f"mask cache index {index} is unreadable" in capsys.readouterr().err


def test_dangling_mask_symlink_counts_as_missing(root_copy, tmp_path):
    mask = first_mask(root_copy)
    mask.unlink()
    mask.symlink_to(tmp_path / "gone.json")
    out = tmp_path / "o"
    main_pretrain.cli(common(str(root_copy), out, "--mask_method", "segments", "--allow_missing_masks",
                             "--batch_size", "7"))
    assert (out / "checkpoint-0.pth").exists()


def test_empty_class_folder(root_copy, tmp_path, capsys):
    (root_copy / "train" / "zzz_empty").mkdir()
    assert run_exit_code(common(str(root_copy), tmp_path / "a")) == 1
    assert "zzz_empty" in capsys.readouterr().err
    main_pretrain.cli(common(str(root_copy), tmp_path / "b", "--skip_bad_samples"))
    assert (tmp_path / "b" / "checkpoint-0.pth").exists()


def test_fp16_on_cpu_and_output_dir_that_is_a_file(toy_root, tmp_path, capsys):
    assert run_exit_code(common(toy_root, tmp_path / "o", "--amp", "fp16")) == 1
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run_exit_code(common(toy_root, tmp_path / "file")) == 1
    assert "is a file" in capsys.readouterr().err


def test_visualize_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, "tools/visualize.py", "--checkpoint", str(tmp_path / "none.pth")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "none.pth" in res.stderr


# ------------------------------------------------------------------------------------------------
# distributed and hygiene

def test_a_blocking_read_fails_with_the_file_named(root_copy, tmp_path, capsys):
    mask = first_mask(root_copy)
    mask.unlink()
    os.mkfifo(mask)  # opening it blocks forever, like a hung network file system
    start = time.time()
    assert run_exit_code(common(str(root_copy), tmp_path / "o", "--mask_method", "segments",
                                "--data_timeout", "1")) == 1
    assert time.time() - start < 60
    err = capsys.readouterr().err
    assert str(mask) in err and "--data_timeout" in err


def test_collectives_get_the_dist_timeout(monkeypatch):
    import argparse
    import datetime

    import torch.distributed as dist

    import run.distributed as distributed
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = argparse.Namespace(dist_on_itp=False, device="cpu", dist_url="env://", dist_timeout=42)
    distributed.init_distributed_mode(args)
    distributed.setup_for_distributed(True)
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    assert main_pretrain.get_args_parser().parse_args([]).dist_timeout == distributed.DEFAULT_DIST_TIMEOUT_S


def test_stale_temp_files_of_killed_writers_are_removed(toy_root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".checkpoint-0.pth.tmp99999").write_bytes(b"\0" * 1000)
    (out / "notes.tmp1").write_text("not ours")
    main_pretrain.cli(common(toy_root, out))
    assert not (out / ".checkpoint-0.pth.tmp99999").exists() and (out / "notes.tmp1").exists()


def test_log_has_one_row_per_epoch_after_resume_and_a_torn_line(toy_root, tmp_path):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--epochs", "3", "--save_freq", "1", "--stop_epoch", "2"))
    os.remove(out / "checkpoint-1.pth")  # killed after epoch 1's row, before its checkpoint
    with open(out / "log.txt", "a") as f:
        f.write('{"train_loss": 0.')  # torn by a crash mid-append
    main_pretrain.cli(common(toy_root, out, "--epochs", "3", "--save_freq", "1"))
    assert log_epochs(out) == [0, 1, 2]


def test_stack_official_records_and_checks_its_sha256(tmp_path, monkeypatch, capsys):
    import argparse
    import urllib.error
    import urllib.request
    source = tmp_path / "src.pth"
    torch.save({"model": {"w": torch.ones(2)}}, source)
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, path: shutil.copy(source, path))
    args = argparse.Namespace(stack="official", model="mae_vit_base_patch16", output_dir=str(tmp_path / "b"),
                              stack_sha256="")
    path = evals.runs.resolve_stack(args)
    digest = checkpoint.file_digest(str(source), "sha256")
    assert evals.runs.stack_sha256(args) == digest and open(path + ".sha256").read().split()[0] == digest
    assert digest in capsys.readouterr().out
    assert evals.runs.resolve_stack(args) == path  # later use: verified, not downloaded again
    with open(path, "ab") as f:
        f.write(b"changed")
    with pytest.raises(UserError, match="the file changed"):
        evals.runs.resolve_stack(args)

    def offline(url, path):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    args.output_dir = str(tmp_path / "c")
    with pytest.raises(UserError, match="cannot download .*without network, copy the file"):
        evals.runs.resolve_stack(args)
