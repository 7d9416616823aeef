"""main_pretrain.py end to end on the toy data: every method, resume, logs, errors."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import main_pretrain
import models_mae
from conftest import REPO
from run.checkpoint import StorageError, atomic_torch_save, find_last_checkpoint


def common(toy_root, out, *extra):
    return ["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
            "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "1", "--blr", "1e-3",
            "--num_workers", "0", "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu",
            "--print_freq", "2", *extra]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["patches", "segments", "four_channels", "preencoder"])
def test_cli_each_method_one_epoch(toy_root, tmp_path, method):
    out = tmp_path / method
    cmd = [sys.executable, "main_pretrain.py", *common(toy_root, out, "--mask_method", method,
                                                        "--coverage_ratio", "30")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "img/s" in res.stdout and "eta:" in res.stdout
    ckpt = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"}
    args = ckpt["args"]
    assert args.mask_method == method and args.coverage_ratio == 30.0
    assert args.in_chans == (4 if method == "four_channels" else 3)
    assert args.input_size == [32, 32] and args.model == "mae_vit_tiny_patch8"
    assert any(k.startswith("preencoder.") for k in ckpt["model"]) == (method == "preencoder")
    model = models_mae.build_mae(args.model, img_size=32, mask_method=method)
    model.load_state_dict(ckpt["model"], strict=True)
    lines = (out / "log.txt").read_text().splitlines()
    stats = json.loads(lines[0])
    assert stats["epoch"] == 0 and stats["train_loss"] > 0 and stats["train_img_per_sec"] > 0
    assert ("train_empty_segments" in stats) == (method != "patches")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(toy_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = common(toy_root, straight, "--mask_method", "preencoder", "--epochs", "2", "--save_freq", "1")
    main_pretrain.cli(base)
    # a second run that starts from the first run's epoch-0 checkpoint (as after a crash in epoch 1)
    main_pretrain.cli(common(toy_root, resumed, "--mask_method", "preencoder", "--epochs", "2",
                             "--save_freq", "1", "--resume", str(straight / "checkpoint-0.pth")))
    a = torch.load(straight / "checkpoint-1.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint-1.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["epoch"] == b["epoch"] == 1


@pytest.mark.slow
def test_resume_with_workers_and_patches(toy_root, tmp_path):
    """Random patch masks (global RNG) and augmentations in worker processes resume exactly too."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--mask_method", "patches", "--epochs", "2", "--save_freq", "1", "--num_workers", "2"]
    main_pretrain.cli(common(toy_root, straight, *args))
    main_pretrain.cli(common(toy_root, resumed, *args, "--resume", str(straight / "checkpoint-0.pth")))
    a = torch.load(straight / "checkpoint-1.pth", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoint-1.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_and_lr_scaling(toy_root, tmp_path):
    out = tmp_path / "accum"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segments", "--accum_iter", "2",
                             "--batch_size", "4", "--blr", "2e-3"))
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    # lr = blr * batch_size * accum_iter * world_size / 256
    assert ckpt["args"].lr == pytest.approx(2e-3 * 4 * 2 / 256)
    # 32 images / 4 per step = 8 micro-steps = 4 optimizer steps
    assert all(s["step"].item() == 4 for s in ckpt["optimizer"]["state"].values())


def test_non_finite_loss_stops_and_keeps_the_checkpoint(toy_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    original = models_mae.MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def nan_from_epoch_2(self, imgs, pred, mask):  # 4 steps per epoch
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(models_mae.MaskedAutoencoderViT, "forward_loss", nan_from_epoch_2)
    flags = ["--mask_method", "segments", "--epochs", "3", "--save_freq", "1", "--warmup_epochs", "0"]
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(toy_root, out, *flags))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "loss is not finite" in err and "epoch 2" in err and "intact" in err
    assert not (out / "checkpoint-2.pth").exists()
    last = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())

    # resuming from it and failing again leaves it byte for byte as it was
    before = sha(out / "checkpoint-1.pth")
    with pytest.raises(SystemExit):
        main_pretrain.cli(common(toy_root, out, *flags, "--resume", str(out / "checkpoint-1.pth")))
    assert sha(out / "checkpoint-1.pth") == before and not (out / "checkpoint-2.pth").exists()


@pytest.mark.parametrize("flags, message", [
    (["--coverage_ratio", "0"], "coverage_ratio"),
    (["--coverage_ratio", "120"], "coverage_ratio"),
    (["--mask_ratio", "1.0"], "mask_ratio"),
    (["--input_size", "36"], "not divisible by the patch size 8"),
    (["--input_size", "32", "48", "64"], "one or two integers"),
    (["--batch_size", "0"], "batch_size"),
    (["--model", "mae_vit_nope"], "unknown model"),
    (["--mask_method", "blobs"], "mask_method"),
])
def test_bad_flags_are_argparse_errors(toy_root, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(toy_root, tmp_path / "x", *flags))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was started


def test_bad_data_path_is_a_clear_error(tmp_path, capsys, toy_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(str(tmp_path / "empty"), tmp_path / "o"))
    assert exc.value.code == 1
    assert "has no train/ folder" in capsys.readouterr().err


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-0.pth")
    atomic_torch_save({"w": torch.ones(3), "epoch": 0}, path)
    before = sha(path)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(StorageError, match=r"could not write .*checkpoint-0.pth: No space left on device \(.* free there\)"):
        atomic_torch_save({"w": torch.zeros(3), "epoch": 1}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sha(path) == before
    assert os.listdir(tmp_path) == ["checkpoint-0.pth"]
    assert find_last_checkpoint(str(tmp_path)) == path


def test_resume_with_another_mask_method_or_a_broken_file_is_a_clear_error(toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "four_channels"))
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(toy_root, tmp_path / "b", "--mask_method", "segments",
                                 "--resume", str(out / "checkpoint-0.pth")))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "--mask_method four_channels" in err and "this run has --mask_method segments" in err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(open(out / "checkpoint-0.pth", "rb").read()[:1000])
    with pytest.raises(SystemExit):
        main_pretrain.cli(common(toy_root, tmp_path / "c", "--mask_method", "four_channels", "--resume", str(broken)))
    assert "cannot load checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_pretrain.cli(common(toy_root, tmp_path / "d", "--resume", str(tmp_path / "nope.pth")))
    assert "checkpoint not found" in capsys.readouterr().err
