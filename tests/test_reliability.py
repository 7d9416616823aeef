"""Faults a week-long run meets, tried one by one: the run continues correctly, or stops with the
promised message and intact checkpoints. docs/RELIABILITY.md tabulates them."""
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_pretrain_cli import common

import main_pretrain
import models_mae
import submitit_pretrain
from conftest import REPO
from run.checkpoint import atomic_torch_save, auto_resume, find_last_checkpoint, prune_checkpoints
from run.slurm import Trainer


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_killing_a_checkpoint_writer_leaves_the_previous_checkpoint_readable(tmp_path):
    path = tmp_path / "checkpoint-0.pth"
    atomic_torch_save({"epoch": 0, "w": torch.ones(4)}, str(path))
    before = sha(path)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import run.files as m; "
        "m.atomic_torch_save({'epoch': 1, 'w': torch.zeros(150_000_000)}, sys.argv[2])"), REPO, str(path)])
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it as soon as the temporary file is being written
        tmps = [f for f in os.listdir(tmp_path) if ".tmp" in f]
        if tmps and os.path.getsize(tmp_path / tmps[0]) > 0:
            break
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert sha(path) == before
    assert torch.load(path, weights_only=True)["epoch"] == 0
    assert find_last_checkpoint(str(tmp_path)) == str(path)  # the leftover temp file is ignored


def test_newest_checkpoint_is_found_by_content(tmp_path):
    atomic_torch_save({"epoch": 3}, str(tmp_path / "checkpoint-3.pth"))
    (tmp_path / "checkpoint-5.pth").write_bytes(b"truncated by a crash")
    atomic_torch_save({"epoch": 4}, str(tmp_path / "checkpoint-0.pth"))  # renamed by hand
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-0.pth")


@pytest.mark.slow
def test_a_killed_run_rerun_as_is_continues_and_matches_an_uninterrupted_one(toy_root, tmp_path):
    flags = ["--mask_method", "four_channels", "--epochs", "3", "--save_freq", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main_pretrain.cli(common(toy_root, straight, *flags))
    cmd = [sys.executable, "main_pretrain.py", *common(toy_root, killed, *flags)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-0.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
    proc.wait()
    assert (killed / "checkpoint-0.pth").exists()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)  # the same command
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Auto-resume" in res.stdout
    a = torch.load(straight / "checkpoint-2.pth", weights_only=True)["model"]
    b = torch.load(killed / "checkpoint-2.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_stops_with_a_message_and_keeps_the_old_checkpoint(toy_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    flags = ["--mask_method", "segments", "--epochs", "2", "--save_freq", "1"]
    real_save = torch.save
    calls = {"n": 0}

    def disk_full_on_second_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(toy_root, out, *flags))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err and "checkpoint-0.pth" in err
    assert torch.load(out / "checkpoint-0.pth", weights_only=True)["epoch"] == 0
    assert not (out / "checkpoint-1.pth").exists() and not [f for f in os.listdir(out) if ".tmp" in f]


def test_keep_last_prunes_old_checkpoints_but_never_the_newest(toy_root, tmp_path):
    out = tmp_path / "keep"
    main_pretrain.cli(common(toy_root, out, "--epochs", "4", "--save_freq", "1", "--keep_last", "2"))
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint-2.pth", "checkpoint-3.pth"]
    prune_checkpoints(str(out), 0)  # even K = 0 keeps the newest
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint-3.pth"]


@pytest.fixture
def damaged_root(toy_root, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(toy_root, root)
    with open(root / "train" / "discs" / "discs_train_0002.png", "r+b") as f:
        f.truncate(50)
    (root / "masks" / "boxes" / "boxes_train_0005.json").write_text('{"annotations": [{"area": 3')
    return str(root)


def test_bad_samples_stop_the_run_with_their_path(damaged_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(damaged_root, tmp_path / "o", "--mask_method", "segments"))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "discs_train_0002.png" in err or "boxes_train_0005.json" in err


def test_skip_bad_samples_continues_counts_and_lists_them(damaged_root, tmp_path):
    out = tmp_path / "skip"
    # 32 images, batch 8: every sample is visited once, the two damaged ones included
    main_pretrain.cli(common(damaged_root, out, "--mask_method", "segments", "--skip_bad_samples"))
    import json
    stats = json.loads((out / "log.txt").read_text())
    assert stats["train_bad_samples"] == 2
    listed = (out / "bad_samples.txt").read_text()
    assert "discs_train_0002.png" in listed and "boxes_train_0005.json" in listed
    assert torch.load(out / "checkpoint-0.pth", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("limit, stops", [(2, False), (1, True)])
def test_skip_nonfinite_skips_at_most_n_steps(toy_root, tmp_path, monkeypatch, capsys, limit, stops):
    original = models_mae.MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def nan_on_steps_2_and_3(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "forward_loss", nan_on_steps_2_and_3)
    out = tmp_path / "nan"
    argv = common(toy_root, out, "--mask_method", "preencoder", "--skip_nonfinite", str(limit))
    if stops:
        with pytest.raises(SystemExit):
            main_pretrain.cli(argv)
        assert "more than --skip_nonfinite 1" in capsys.readouterr().err and not out.joinpath("checkpoint-0.pth").exists()
    else:
        main_pretrain.cli(argv)
        import json
        stats = json.loads((out / "log.txt").read_text())
        assert stats["train_skipped_nonfinite_steps"] == 2 and stats["train_loss"] == stats["train_loss"]  # finite
        sd = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_submitit_dry_run_shows_the_sbatch_script(capsys, toy_root):
    submitit_pretrain.main(["--dry_run", "--job_dir", "/tmp/jobs/%j", "--nodes", "4", "--ngpus", "8",
                            "--partition", "learnfair", "--comment", "deadline", "--use_volta32", "--timeout", "600",
                            "--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32"])
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=learnfair", "#SBATCH --comment=deadline", "#SBATCH --constraint=volta32gb",
                 "#SBATCH --time=600", "#SBATCH --signal=USR2@120", "srun"):
        assert line in script, line
    with pytest.raises(SystemExit):  # the training flags are checked before anything is submitted
        submitit_pretrain.main(["--dry_run", "--data_path", toy_root, "--coverage_ratio", "0"])


def test_requeue_resumes_from_the_newest_checkpoint(toy_root, tmp_path):
    args = submitit_pretrain.parse_args(["--job_dir", str(tmp_path), "--data_path", toy_root, "--resume",
                                         "old.pth", "--output_dir", str(tmp_path)])
    assert args.save_freq == 1  # a preempted job loses at most one epoch
    delayed = Trainer(main_pretrain.main, args).checkpoint()
    requeued = delayed.function
    assert isinstance(requeued, Trainer) and requeued.args.resume == ""
    assert requeued.args.dist_url.startswith("file://")
    atomic_torch_save({"epoch": 7}, str(tmp_path / "checkpoint-7.pth"))
    auto_resume(requeued.args)
    assert requeued.args.resume == str(tmp_path / "checkpoint-7.pth")


@pytest.mark.slow
def test_submitit_local_job_preempted_requeues_and_resumes(toy_root, tmp_path):
    """SIGUSR2 (SLURM's preemption signal) to the running task: submitit calls Trainer.checkpoint,
    the local executor starts the task again, and it resumes from the newest checkpoint."""
    job = submitit_pretrain.main(["--cluster", "local", "--ngpus", "1", "--nodes", "1", "--job_dir", str(tmp_path),
                                  "--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                                  "--batch_size", "16", "--epochs", "5", "--warmup_epochs", "0", "--num_workers", "0",
                                  "--device", "cpu", "--mask_method", "segments"])
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint-0.pth").exists() and time.time() < deadline:
        time.sleep(0.1)
    tasks = subprocess.run(["pgrep", "-P", str(job._process.pid)], capture_output=True, text=True).stdout.split()
    assert tasks, "the local job's task process was not found"
    for pid in tasks:
        os.kill(int(pid), signal.SIGUSR2)
    job.result()
    logs = "".join(open(f).read() for f in glob.glob(str(tmp_path / "*_log.*")))
    assert "this job is preempted" in logs and "Requeued job" in logs
    assert "Auto-resume: found" in logs
    assert torch.load(tmp_path / "checkpoint-4.pth", weights_only=True)["epoch"] == 4


def test_benchmark_slurm_dry_run_is_one_task_with_all_gpus(toy_root, toy_ade20k, tmp_path, capsys):
    import benchmark
    benchmark.cli(["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(tmp_path),
                   "--num-gpus", "8", "--slurm", "--dry_run", "--partition", "gpu", "--timeout", "2880"])
    script = capsys.readouterr().out
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --job-name=mae_benchmark"):
        assert line in script, line
    assert not (tmp_path / "pretrain_output").exists()  # nothing ran
