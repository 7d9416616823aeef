"""Faults of runs, checkpoints and ranks (issue 46, third campaign): files a run cannot read are
never written over, finetuned checkpoints know their classes, ranks compare the checkpoint they
resume, a resume says what changes (the effective batch, a missing optimizer), a checkpoint
written over while it is read is caught, non-finite encoders are refused where they are used,
every rank's error is seen, the rendezvous is bounded by --dist_timeout, auxiliary outputs
(TensorBoard, bad_samples.txt) never stop training, and impossible values are one line.
docs/RELIABILITY.md lists them with their outcome."""
import argparse
import builtins
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_faults import run_exit_code
from test_faults_runs import PER_RANK_LAUNCHER
from test_finetune import downstream
from test_pretrain_cli import common

import main_finetune
import main_pretrain
import models_mae
import models_vit
import run.distributed as distributed
import run.setup as runsetup
import segmenter.train
from conftest import REPO
from inputs.images import DataError
from run.checkpoint import (CheckpointError, Resumed, content_fingerprint, load_checkpoint, resume_states,
                            save_checkpoint)
from segmenter.checkpoints import read_variant
from tools import export
from util.misc import UserError, setup_for_distributed


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def cli_checks(parser, check_args, argv):
    """What a command line does before its main: parse (either spelling) and check its flags. Returns
    'checked', or the SystemExit code; main itself never runs."""
    try:
        return runsetup.run_cli(parser, check_args, lambda args: "checked", argv)
    except SystemExit as e:
        return e.code


def tiny_mae_checkpoint(path, nan_key=None, **args):
    """A tiny MAE (patch 8, 32 px) pretraining checkpoint, optionally with NaN in one tensor."""
    torch.manual_seed(0)
    mae = models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method="patches")
    sd = mae.state_dict()
    if nan_key:
        sd[nan_key] = sd[nan_key].clone()
        sd[nan_key][0] = float("nan")
    saved = dict(model="mae_vit_tiny_patch8", mask_method="patches", input_size=[32, 32])
    saved.update(args)
    torch.save({"model": sd, "epoch": 0, "args": argparse.Namespace(**saved)}, path)
    return str(path)


@pytest.fixture(scope="module")
def two_epochs(toy_root, tmp_path_factory):
    """checkpoint-0.pth and checkpoint-1.pth of a 3-epoch run stopped after 2 (tiny MAE, one process)."""
    out = tmp_path_factory.mktemp("two_epochs")
    main_pretrain.cli(common(toy_root, out, "--epochs", "3", "--save_freq", "1", "--stop_epoch", "2"))
    return out


class Started(BaseException):
    """Stands in for the rest of a run once what a test checks has happened."""


def stop_before_training(monkeypatch):
    def stop(*args, **kwargs):
        raise Started

    monkeypatch.setattr(runsetup, "check_trains_something", stop)


# ---- 6. a file the run cannot read is never written over ------------------------------------------

@pytest.mark.parametrize("unreadable", ["epoch_abc", "newer_layout"])
def test_a_checkpoint_this_version_cannot_read_is_never_written_over(toy_root, tmp_path, capsys, unreadable):
    out = tmp_path / "o"
    out.mkdir()
    other = ({"epoch": "abc", "model": {"w": torch.ones(2)}} if unreadable == "epoch_abc"
             else {"format": 7, "state": {"weights": torch.ones(2)}, "step": 123})  # no epoch where we look
    torch.save(other, out / "checkpoint-1.pth")
    before = sha(out / "checkpoint-1.pth")
    assert run_exit_code(common(toy_root, out, "--epochs", "3", "--save_freq", "1")) == 1
    err = capsys.readouterr().err
    assert "checkpoint-1.pth is not a checkpoint this version can read" in err and "mv " in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sha(out / "checkpoint-1.pth") == before  # intact
    assert not (out / "checkpoint-0.pth").exists()  # stopped before training, not after an epoch


def test_a_save_never_writes_over_a_file_it_cannot_read(tmp_path):
    path = tmp_path / "checkpoint-3.pth"
    path.write_bytes(b"not a checkpoint: appeared while the run was going")
    with pytest.raises(CheckpointError, match="nothing is written over a file that could not be read"):
        save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3}, str(path))
    assert path.read_bytes().startswith(b"not a checkpoint")


# ---- 12. a finetuned checkpoint knows its classes ------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    main_finetune.cli(downstream(toy_root, out))
    return str(out / "checkpoint-0.pth")


def test_eval_refuses_a_renamed_class_folder(toy_root, finetuned, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy_root, data, ignore=shutil.ignore_patterns("masks"))
    for split in ("train", "val"):
        os.rename(data / split / "discs", data / split / "disks")  # sorted order unchanged: labels would not move
    out = tmp_path / "ev"
    assert run_exit_code(downstream(str(data), out, "--eval", "--resume", finetuned), main_finetune.cli) == 1
    err = capsys.readouterr().err
    assert "class folder(s) it does not know (disks)" in err and "lacks 1 of its classes (discs)" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_maps_the_labels_by_name_when_a_class_folder_is_missing(toy_root, finetuned, tmp_path, monkeypatch,
                                                                      capsys):
    data = tmp_path / "data"
    shutil.copytree(toy_root, data, ignore=shutil.ignore_patterns("masks"))
    for split in ("train", "val"):
        shutil.rmtree(data / split / "boxes")  # the first class: every label after it would move down by one
    recorded = ["boxes", "discs", "stripes", "triangles"]  # the classes it was finetuned on
    seen = {}
    real = main_finetune.evaluate
    monkeypatch.setattr(main_finetune, "evaluate", lambda loader, *a, **k: seen.setdefault("val", loader.dataset)
                        and real(loader, *a, **k))
    main_finetune.cli(downstream(str(data), tmp_path / "ev", "--eval", "--resume", finetuned))
    pairs = list(seen["val"].samples)
    assert pairs and all(label == recorded.index(os.path.basename(os.path.dirname(path))) for path, label in pairs)
    assert "labels are mapped to its classes by name" in capsys.readouterr().out
    assert load_checkpoint(finetuned)["args"].config["classes"] == recorded


# ---- 13. ranks resuming different checkpoints -----------------------------------------------------

def test_the_ranks_check_compares_the_resumed_checkpoint(toy_root, two_epochs, tmp_path, monkeypatch):
    copy = tmp_path / "copy.pth"
    shutil.copy(two_epochs / "checkpoint-1.pth", copy)
    assert content_fingerprint(str(copy)) == content_fingerprint(str(two_epochs / "checkpoint-1.pth"))
    assert content_fingerprint(str(two_epochs / "checkpoint-0.pth")) != content_fingerprint(str(copy))
    checked = []

    def check_ranks_agree(args, data):
        checked.append(data)
        raise Started

    monkeypatch.setattr(main_pretrain, "check_ranks_agree", check_ranks_agree)
    with pytest.raises(Started):
        main_pretrain.cli(common(toy_root, tmp_path / "p", "--epochs", "3", "--resume", str(copy)))
    assert checked[0]["resumed checkpoint"] == (1, content_fingerprint(str(copy)))


@pytest.mark.slow
def test_ranks_resuming_different_checkpoints_are_refused(toy_root, two_epochs, tmp_path):
    argv0 = common(toy_root, tmp_path / "two", "--epochs", "3", "--dist_timeout", "60", "--resume",
                   str(two_epochs / "checkpoint-1.pth"))
    argv1 = list(argv0)
    argv1[-1] = str(two_epochs / "checkpoint-0.pth")  # rank 1 continues another epoch
    launcher = tmp_path / "launch.py"
    launcher.write_text(PER_RANK_LAUNCHER.format(repo=REPO, argvs=json.dumps([argv0, argv1])))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(launcher)], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "the ranks disagree" in text and "resumed checkpoint: rank 0 (1, " in text, \
        text[-3000:]
    assert not (tmp_path / "two" / "checkpoint-2.pth").exists()


# ---- 14. another effective batch on resume ---------------------------------------------------------

def test_a_resume_with_another_effective_batch_is_refused_unless_accepted(toy_root, two_epochs, tmp_path, capsys):
    out = tmp_path / "o"
    first = str(two_epochs / "checkpoint-0.pth")
    assert run_exit_code(common(toy_root, out, "--epochs", "3", "--accum_iter", "2", "--resume", first)) == 1
    err = capsys.readouterr().err
    assert "effective batch of 8 and this run has 16 (--accum_iter 1 -> 2)" in err and "--accept_batch_change" in err
    assert not (out / "checkpoint-1.pth").exists()
    # another number of ranks: the checkpoint says 2, this run is one process
    saved = torch.load(first, weights_only=True)
    saved["args"].world_size, saved["args"].lr = 2, 6.25e-5  # as two ranks with --blr 1e-3 trained it
    torch.save(saved, tmp_path / "two_ranks.pth")
    resume = ["--resume", str(tmp_path / "two_ranks.pth")]
    assert run_exit_code(common(toy_root, out, "--epochs", "3", *resume)) == 1
    assert "effective batch of 16 and this run has 8 (ranks 2 -> 1)" in capsys.readouterr().err
    main_pretrain.cli(common(toy_root, out, "--epochs", "3", "--accept_batch_change", "--stop_epoch", "2", *resume))
    err = capsys.readouterr().err
    assert "the effective batch changes from 16 to 8 (ranks 2 -> 1)" in err
    assert "the run continues with lr 3.13e-05 (--blr 1.00e-03 x 8 / 256) (it trained with lr 6.25e-05)" in err
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["epoch"] == 1


# ---- 15. a checkpoint without optimizer state -------------------------------------------------------

def test_resuming_weights_without_optimizer_state_says_what_the_run_does(toy_root, two_epochs, tmp_path, monkeypatch,
                                                                         capsys):
    weights_only = torch.load(two_epochs / "checkpoint-0.pth", weights_only=True)
    del weights_only["optimizer"]
    torch.save(weights_only, tmp_path / "weights.pth")
    stop_before_training(monkeypatch)
    with pytest.raises(Started):
        main_pretrain.cli(common(toy_root, tmp_path / "p", "--epochs", "3", "--resume", str(tmp_path / "weights.pth")))
    err = capsys.readouterr().err
    assert "holds no optimizer state: its weights are loaded, the optimizer starts afresh" in err
    assert "pass --start_epoch 1" in err


# ---- 16. a checkpoint written over in place while it is read ----------------------------------------

def two_checkpoints(tmp_path):
    first, second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    torch.save({"model": first.state_dict(), "epoch": 1}, tmp_path / "a.pth")
    torch.save({"model": second.state_dict(), "epoch": 2}, tmp_path / "b.pth")
    shutil.copy(tmp_path / "b.pth", tmp_path / "b_before.pth")
    return str(tmp_path / "a.pth"), str(tmp_path / "b.pth")


def overwrite_in_place(target, source):
    time.sleep(0.05)  # past the file system's timestamp granularity
    with open(target, "r+b") as f:  # same inode, as cp onto an existing file
        f.write(open(source, "rb").read())
        f.truncate()


def test_a_checkpoint_copied_over_while_it_is_read_is_caught(tmp_path):
    a, b = two_checkpoints(tmp_path)
    checkpoint = load_checkpoint(a)  # the record is read now, the tensors when used
    overwrite_in_place(a, b)
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        resume_states(Resumed(a, checkpoint, {}), torch.nn.Linear(64, 64))
    # unchanged, or replaced by another file (an atomic save: the mapped file is read whole): loads as before
    resume_states(Resumed(b, load_checkpoint(b), {}), torch.nn.Linear(64, 64))
    checkpoint = load_checkpoint(b)
    shutil.copy(a, tmp_path / "new.pth")
    os.replace(tmp_path / "new.pth", b)
    model = torch.nn.Linear(64, 64)
    assert resume_states(Resumed(b, checkpoint, {}), model, torch.optim.SGD(model.parameters(), lr=0.1)) == 0
    assert torch.equal(model.weight, torch.load(tmp_path / "b_before.pth", weights_only=True)["model"]["weight"])


def test_an_encoder_copied_over_while_it_is_read_is_caught(tmp_path):
    a = tiny_mae_checkpoint(tmp_path / "a.pth")
    b = tiny_mae_checkpoint(tmp_path / "b.pth", input_size=[32, 32], norm_pix_loss=True)  # another record
    checkpoint = load_checkpoint(a)
    overwrite_in_place(a, b)
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        models_vit.load_encoder(a, checkpoint)


# ---- 17. non-finite encoders are refused where they are used ----------------------------------------

def test_export_refuses_non_finite_weights_naming_the_tensor(tmp_path, capsys):
    path = tiny_mae_checkpoint(tmp_path / "nan.pth", nan_key="blocks.1.attn.qkv.weight")
    with pytest.raises(SystemExit) as exc:
        runsetup.run_tool(export.main, ["--checkpoint", path, "--to", "timm", "--out", str(tmp_path / "timm")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "holds non-finite weights (NaN/inf in 'blocks.1.attn.qkv.weight')" in err
    assert not (tmp_path / "timm" / "model.safetensors").exists()


@pytest.mark.parametrize("use", ["finetune", "stack"])
def test_finetuning_and_stack_refuse_non_finite_weights_naming_the_tensor(tmp_path, use):
    path = tiny_mae_checkpoint(tmp_path / "nan.pth", nan_key="blocks.0.mlp.fc1.weight")
    with pytest.raises(CheckpointError, match=r"NaN/inf in 'blocks\.0\.mlp\.fc1\.weight'"):
        if use == "finetune":
            models_vit.load_pretrained_encoder(models_vit.vit_tiny_patch8(img_size=32, num_classes=4), path)
        else:
            models_vit.stack_official_into_mae(
                models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method="four_channels"), path)


# ---- 19. flags that would be ignored ---------------------------------------------------------------

def test_mask_flags_given_to_patches_are_named(capsys):
    parser = main_pretrain.get_args_parser()
    assert cli_checks(parser, main_pretrain.check_args, ["--mask_method", "patches", "--coverage_ratio", "40",
                                                         "--mask_format", "amg", "--device", "cpu"]) == "checked"
    err = capsys.readouterr().err
    assert "--coverage_ratio is ignored by --mask_method patches" in err
    assert "--mask_format is ignored by --mask_method patches" in err


def test_resume_with_stack_is_refused_and_auto_resume_says_which_wins(toy_root, tmp_path, monkeypatch, capsys):
    parser = main_pretrain.get_args_parser()
    assert cli_checks(parser, main_pretrain.check_args, ["--resume", "r.pth", "--stack", "s.pth"]) == 2
    assert "pass only one" in capsys.readouterr().err
    stack = tiny_mae_checkpoint(tmp_path / "official.pth")
    out = tmp_path / "o"
    argv = common(toy_root, out, "--mask_method", "four_channels", "--epochs", "2", "--save_freq", "1", "--stack",
                  stack)
    main_pretrain.cli(argv + ["--stop_epoch", "1"])
    capsys.readouterr()
    stop_before_training(monkeypatch)
    with pytest.raises(Started):
        main_pretrain.cli(argv)  # the same command again: auto-resume
    assert f"--stack {stack} is not loaded: the run it started continues from" in capsys.readouterr().out


# ---- 21. every rank's fatal error is seen ------------------------------------------------------------

def test_an_error_on_a_rank_other_than_0_is_printed_with_its_rank(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    setup_for_distributed(False)  # as on rank 1: print() is silenced
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def main(args):
        raise DataError("/data/rank1 does not exist: expected <data_path>/train/<class>/<image>")

    with pytest.raises(SystemExit) as exc:
        runsetup.run_cli(argparse.ArgumentParser(), lambda args, parser: None, main, [])
    assert exc.value.code == 1
    assert "ERROR (rank 1): /data/rank1 does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rank_with_a_wrong_data_path_is_heard(toy_root, tmp_path):
    argv0 = common(toy_root, tmp_path / "o", "--dist_timeout", "60")
    argv1 = list(argv0)
    argv1[argv1.index("--data_path") + 1] = str(tmp_path / "nowhere")
    launcher = tmp_path / "launch.py"
    launcher.write_text(PER_RANK_LAUNCHER.format(repo=REPO, argvs=json.dumps([argv0, argv1])))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(launcher)], cwd=REPO, capture_output=True, text=True, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and f"ERROR (rank 1): --data_path {tmp_path / 'nowhere'} does not exist" in text, \
        text[-3000:]
    assert "ERROR (rank 0): lost contact with another rank" in text  # not gloo's traceback


# ---- 22, 25. the rendezvous is bounded by --dist_timeout ---------------------------------------------

def init_in_thread(monkeypatch, rank, port, timeout_s):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    args = argparse.Namespace(dist_on_itp=False, device="cpu", dist_url="env://", dist_timeout=timeout_s)
    outcome = {}

    def init():
        try:
            distributed.init_distributed_mode(args)
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e

    thread = threading.Thread(target=init, daemon=True)
    start = time.time()
    thread.start()
    thread.join(40)  # the code before this fix waited without end (the test must not)
    return thread, outcome, time.time() - start


def test_a_master_port_owned_by_another_program_fails_within_the_dist_timeout(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never answers
    connections = []
    threading.Thread(target=lambda: [connections.append(server.accept()[0]) for _ in range(8)], daemon=True).start()
    try:
        thread, outcome, took = init_in_thread(monkeypatch, 1, server.getsockname()[1], 1)
    finally:
        for c in connections:
            c.close()
        server.close()
    assert not thread.is_alive() and took < 1 + distributed.RENDEZVOUS_GRACE_S + 5
    assert isinstance(outcome.get("error"), UserError)
    assert "did not complete within --dist_timeout 1 s" in str(outcome["error"])
    assert "MASTER_PORT" in str(outcome["error"])


def test_a_rank_that_never_starts_is_one_line_after_the_dist_timeout(monkeypatch):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    thread, outcome, took = init_in_thread(monkeypatch, 0, port, 2)
    assert not thread.is_alive() and took < 2 + distributed.RENDEZVOUS_GRACE_S + 5
    assert isinstance(outcome.get("error"), UserError), outcome
    assert "only 1 of 2 ranks joined the rendezvous" in str(outcome["error"])


# ---- 23. auxiliary outputs never stop training; a lost output folder is one line ---------------------

def removing_after_first_epoch(monkeypatch, folder):
    real = main_pretrain.end_epoch

    def end_epoch(args, epoch, *rest):
        real(args, epoch, *rest)
        if epoch == 0:
            shutil.rmtree(folder)

    monkeypatch.setattr(main_pretrain, "end_epoch", end_epoch)


def test_a_deleted_tensorboard_folder_warns_once_and_training_goes_on(toy_root, tmp_path, monkeypatch, capsys):
    out, board = tmp_path / "o", tmp_path / "tb"
    removing_after_first_epoch(monkeypatch, board)
    argv = common(toy_root, out, "--epochs", "2", "--save_freq", "1", "--print_freq", "1")
    argv[argv.index("--log_dir") + 1] = str(board)
    main_pretrain.cli(argv)
    err = capsys.readouterr().err
    assert err.count("WARNING: TensorBoard could not write to") == 1 and "Traceback" not in err
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["epoch"] == 1


def test_an_unwritable_bad_samples_file_warns_once_and_training_goes_on(toy_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy_root, data)
    image = sorted((data / "train" / "discs").iterdir())[0]
    image.write_bytes(image.read_bytes()[:50])  # unreadable
    out = tmp_path / "o"
    (out / "bad_samples.txt").mkdir(parents=True)  # cannot be appended to
    main_pretrain.cli(common(str(data), out, "--epochs", "2", "--skip_bad_samples"))
    err = capsys.readouterr().err
    assert err.count("WARNING: could not append to") == 1 and "bad_samples.txt" in err
    rows = [json.loads(line) for line in open(out / "log.txt")]
    assert [r["train_bad_samples"] for r in rows] == [1, 1]


def test_a_lost_output_folder_stops_with_one_line(toy_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    removing_after_first_epoch(monkeypatch, out)
    assert run_exit_code(common(toy_root, out, "--epochs", "3", "--save_freq", "1", "--print_freq", "1")) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and f"its folder {out} is gone" in errors[0] and "Traceback" not in err


# ---- 25. impossible values: one line each -----------------------------------------------------------

@pytest.mark.parametrize("record, named", [
    ({"epoch": -7}, "records epoch -7, which is not a whole number >= 0"),
    ({"epoch": "abc"}, "records epoch 'abc'"),
    ({"epoch": True}, "records epoch True"),
    ({"args": 5}, "stores its flags ('args') as type int"),
    ({"args": argparse.Namespace(input_size="abc")}, "args.input_size = 'abc', which is not one or two positive"),
    ({"args": argparse.Namespace(nb_classes=-3)}, "args.nb_classes = -3, which is not a positive integer"),
    ({"args": argparse.Namespace(model=["x"])}, "args.model = ['x'], which is not a string"),
    ({"args": argparse.Namespace(config={"classes": "abc"})}, "args.config.classes = 'abc', which is not a list"),
    ({"args": argparse.Namespace(run_start={"data_path": {"a": 1}})}, "args.run_start"),
])
def test_a_checkpoint_record_of_impossible_types_is_one_line(tmp_path, record, named):
    path = tmp_path / "c.pth"
    torch.save({"model": {"w": torch.ones(2)}, **record}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(str(path))
    assert named in str(exc.value) and "\n" not in str(exc.value)


def test_resuming_epoch_minus_7_and_finetuning_from_args_of_wrong_types_are_one_line(toy_root, two_epochs, tmp_path,
                                                                                      capsys):
    saved = torch.load(two_epochs / "checkpoint-0.pth", weights_only=True)
    saved["epoch"] = -7
    torch.save(saved, tmp_path / "minus7.pth")
    capsys.readouterr()
    assert run_exit_code(common(toy_root, tmp_path / "p", "--resume", str(tmp_path / "minus7.pth"))) == 1
    err = capsys.readouterr().err
    assert "records epoch -7" in err and len(err.strip().splitlines()) == 1
    bad = tiny_mae_checkpoint(tmp_path / "bad.pth", input_size="abc")
    assert run_exit_code(downstream(toy_root, tmp_path / "ft", "--finetune", bad), main_finetune.cli) == 1
    err = capsys.readouterr().err
    assert "args.input_size = 'abc'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, named", [
    (["--device", "xyz"], "'xyz' is not a device"),
    (["--model", "mae_vit_tiny_patch8", "--input_size", "100000"], "patches of 8 px, more than the 65,536"),
])
def test_pretraining_flags_out_of_range_are_one_line(argv, named, capsys):
    assert cli_checks(main_pretrain.get_args_parser(), main_pretrain.check_args, argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize("argv, named", [
    (["--drop_path", "2"], "--drop_path: must be in [0, 1), got 2"),
    (["--smoothing", "1.5"], "--smoothing: must be in [0, 1), got 1.5"),
])
def test_finetuning_rates_out_of_range_are_one_line(argv, named, capsys):
    assert cli_checks(main_finetune.get_args_parser(), main_finetune.check_args, argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--crop-size", "7"], "--crop-size 7 is smaller than the patch size 8"),
    (["--crop-size", "100000"], "--crop-size 100000: 156,250,000 patches"),
    (["--drop-path", "2"], "--drop-path: must be in [0, 1), got 2"),
    (["--device", "xyz"], "'xyz' is not a device"),
])
def test_segmenter_flags_out_of_range_are_one_line(argv, named, capsys):
    base = ["--dataset-dir", "ade", "--log-dir", "seg", "--backbone", "vit_tiny_patch8"]
    assert cli_checks(segmenter.train.get_args_parser(), segmenter.train.check_args, base + argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("tag", ["!!python/name:os.system", '!!python/object/apply:os.system ["true"]'])
def test_a_variant_yml_with_a_python_tag_is_refused(tmp_path, tag):
    (tmp_path / "variant.yml").write_text(f"net_kwargs:\n  backbone: {tag}\n")
    with pytest.raises(CheckpointError, match="only plain YAML and !!python/tuple are read"):
        read_variant(str(tmp_path))
    (tmp_path / "variant.yml").write_text("net_kwargs:\n  image_size: !!python/tuple [512, 512]\n")
    assert read_variant(str(tmp_path))["net_kwargs"]["image_size"] == (512, 512)  # the original's own tag
