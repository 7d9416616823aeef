"""A run is what its flags say: auto-resume continues only the run the command would start,
evaluation reads the model's settings from the checkpoint, every checkpoint and results row
records how to rerun it, and optimizer states (ours and the reference's) load by name."""
import argparse
import os
import shutil

import pytest
import torch
from test_faults import run_exit_code, seg_argv
from test_pretrain_cli import common

import main_finetune
import main_linprobe
import main_pretrain
import models_vit
import run.checkpoint as checkpoint
import run.checkpoint as run_identity
import segmenter.train
from run.setup import adamw
from util.lr_decay import param_groups_layer_decay


def finetune_argv(toy_root, finetune, out, *extra):
    return ["--data_path", toy_root, "--finetune", finetune, "--model", "vit_tiny_patch8", "--input_size", "32",
            "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--nb_classes", "4", "--num_workers", "0",
            "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu", *extra]


def test_auto_resume_refuses_a_run_from_another_finetune_checkpoint(pretrained, toy_root, tmp_path, capsys):
    out = tmp_path / "ft"
    main_finetune.cli(finetune_argv(toy_root, pretrained["patches"], out, "--epochs", "2", "--save_freq", "1"))
    os.remove(out / "checkpoint-1.pth")  # as if it stopped after epoch 0
    assert run_exit_code(finetune_argv(toy_root, pretrained["segments"], out, "--epochs", "2"), main_finetune.cli) == 1
    err = capsys.readouterr().err
    assert pretrained["segments"] in err and pretrained["patches"] in err
    assert "another --output_dir" in err and f"--resume {out / 'checkpoint-0.pth'}" in err
    # the same --finetune continues; the same path with other contents does not
    main_finetune.cli(finetune_argv(toy_root, pretrained["patches"], out, "--epochs", "2"))
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["epoch"] == 1
    copy = tmp_path / "copy.pth"
    shutil.copy(pretrained["patches"], copy)
    out2 = tmp_path / "ft2"
    main_finetune.cli(finetune_argv(toy_root, str(copy), out2, "--epochs", "1"))
    shutil.copy(pretrained["segments"], copy)
    capsys.readouterr()
    assert run_exit_code(finetune_argv(toy_root, str(copy), out2, "--epochs", "2"), main_finetune.cli) == 1
    assert "same path but other contents" in capsys.readouterr().err


def test_auto_resume_refuses_a_pretraining_run_on_other_data(toy_root, tmp_path, capsys):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--epochs", "2", "--stop_epoch", "1"))
    other = tmp_path / "other"
    shutil.copytree(toy_root, other)
    assert run_exit_code(common(str(other), out, "--epochs", "2")) == 1
    assert "did not start where this command starts" in capsys.readouterr().err


def test_finishing_a_finished_finetune_says_so(pretrained, toy_root, tmp_path, capsys):
    out = tmp_path / "ft"
    main_finetune.cli(finetune_argv(toy_root, pretrained["patches"], out))
    capsys.readouterr()
    assert main_finetune.cli(finetune_argv(toy_root, pretrained["patches"], out))["max_accuracy"] >= 0
    assert "Already finished (1 epochs done" in capsys.readouterr().out


def test_eval_takes_model_settings_from_the_checkpoint(pretrained, toy_root, tmp_path, capsys):
    out = tmp_path / "ft"
    main_finetune.cli(finetune_argv(toy_root, pretrained["four_channels"], out, "--nb_classes", "7",
                                    "--input_size", "40", "--cls_token"))
    ckpt = str(out / "checkpoint-0.pth")
    stats = main_finetune.cli(["--eval", "--resume", ckpt, "--data_path", toy_root, "--num_workers", "0",
                               "--device", "cpu", "--batch_size", "8", "--output_dir", ""])
    assert stats["count"] == 8 and "--nb_classes 7 taken from" in capsys.readouterr().out
    # an explicit flag that disagrees is an error naming both values
    assert run_exit_code(["--eval", "--resume", ckpt, "--data_path", toy_root, "--num_workers", "0", "--device", "cpu",
                          "--nb_classes", "5", "--output_dir", ""], main_finetune.cli) == 1
    assert "--nb_classes 7" in capsys.readouterr().err


def test_linprobe_eval_accepts_its_training_batch_size(pretrained, toy_root, tmp_path):
    out = tmp_path / "lp"
    main_linprobe.cli(finetune_argv(toy_root, pretrained["patches"], out))
    stats = main_linprobe.cli(["--eval", "--resume", str(out / "checkpoint-0.pth"), "--data_path", toy_root,
                               "--num_workers", "0", "--device", "cpu", "--output_dir", ""])  # batch 512 default
    assert stats["count"] == 8


def test_segmenter_eval_only_reads_crop_size_and_decoder(pretrained, toy_ade20k, tmp_path, capsys):
    out = tmp_path / "seg"
    argv = seg_argv(toy_ade20k, out) + ["--mae-chp", pretrained["patches"]]
    argv[argv.index("--crop-size") + 1] = "48"
    segmenter.train.cli(argv)
    capsys.readouterr()
    metrics = segmenter.train.cli(["--dataset-dir", str(toy_ade20k), "--log-dir", str(out), "--backbone",
                                   "vit_tiny_patch8", "--eval-only", "--num-workers", "0", "--device", "cpu"])
    out_text = capsys.readouterr().out
    assert "--crop-size 48 taken from" in out_text and "--decoder linear taken from" in out_text
    assert 0 <= metrics["mIoU"] <= 100
    assert run_exit_code(["--dataset-dir", str(toy_ade20k), "--log-dir", str(out), "--backbone", "vit_tiny_patch8",
                          "--eval-only", "--crop-size", "64", "--device", "cpu"], segmenter.train.cli) == 1
    assert "--crop-size 48" in capsys.readouterr().err


def test_every_checkpoint_records_how_to_rerun_it(toy_root, tmp_path):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out))
    record = torch.load(out / "checkpoint-0.pth", weights_only=True)["args"].record
    assert record["torch"] == torch.__version__ and record["world_size"] == 1 and record["gpu_count"] == 0
    assert len(record["git_commit"]) == 40 and isinstance(record["git_dirty"], bool)
    assert "timm" in record and record["command"]


def reference_layout_optimizer(model):
    """An AdamW over the groups the original MAE code builds (timm 0.3.2 registers fc_norm after
    head, so its layer-decay groups come in another order), stepped once: states differ per tensor."""
    params = list(model.named_parameters())
    moved = [x for x in params if not x[0].startswith("fc_norm.")]
    at = max(i for i, (n, _) in enumerate(moved) if n.startswith("head.")) + 1
    moved[at:at] = [x for x in params if x[0].startswith("fc_norm.")]

    class ReferenceOrder(torch.nn.Module):
        blocks = model.blocks

        def named_parameters(self, *a, **k):
            return iter(moved)

    opt = adamw(param_groups_layer_decay(ReferenceOrder(), no_weight_decay=model.no_weight_decay()), lr=1e-3,
                device=torch.device("cpu"), betas=(0.9, 0.999))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_reference_optimizer_state_loads_by_name():
    torch.manual_seed(0)
    model = models_vit.build_vit("vit_tiny_patch8", img_size=(32, 32), num_classes=4, global_pool=True)
    reference = reference_layout_optimizer(model)
    state = reference.state_dict()  # no names, as the original code writes it
    ours = adamw(param_groups_layer_decay(model, no_weight_decay=model.no_weight_decay()), lr=1e-3,
                 device=torch.device("cpu"), betas=(0.9, 0.999))
    with pytest.raises(ValueError):  # loading by position fails, as it did before
        ours.load_state_dict(state)
    checkpoint.load_optimizer_state(ours, state, model)
    for name in ("head.weight", "head.bias", "fc_norm.weight", "blocks.0.attn.qkv.weight"):
        p = dict(model.named_parameters())[name]
        assert torch.equal(ours.state[p]["exp_avg"], reference.state[p]["exp_avg"]), name


def test_our_optimizer_state_carries_names_and_loads_after_a_reorder():
    torch.manual_seed(0)
    model = models_vit.build_vit("vit_tiny_patch8", img_size=(32, 32), num_classes=4, global_pool=True)
    first = reference_layout_optimizer(model)
    state = checkpoint.optimizer_state_dict(first, model)
    assert all("param_names" in g for g in state["param_groups"])
    ours = adamw(param_groups_layer_decay(model, no_weight_decay=model.no_weight_decay()), lr=1e-3,
                 device=torch.device("cpu"), betas=(0.9, 0.999))
    checkpoint.load_optimizer_state(ours, state, model)
    p = model.head.weight
    assert torch.equal(ours.state[p]["exp_avg"], first.state[p]["exp_avg"])


def test_given_flags_are_told_from_defaults():
    import run.flags as flags
    parser = main_pretrain.get_args_parser()
    assert flags.given_flags(parser, ["--coverage_ratio", "40", "--norm_pix_loss"]) == ["coverage_ratio",
                                                                                        "norm_pix_loss"]
    args = argparse.Namespace(resume="", given_flags=[])
    run_identity.reconcile_with_checkpoint(args, ["model"])  # no checkpoint: nothing to do


# ------------------------------------------------------------------------------------------------
# SLURM helpers on first contact (submitit's local executor stands in for SLURM)

def test_submitit_dry_run_without_job_dir(toy_root, tmp_path, capsys, monkeypatch):
    import submitit_pretrain
    monkeypatch.chdir(tmp_path)
    submitit_pretrain.main(["--dry_run", "--data_path", toy_root, "--output_dir", "runs/a"])
    out = capsys.readouterr().out
    assert "#SBATCH" in out and f"job folder {tmp_path / 'runs/a/slurm/%j'}, outputs {tmp_path / 'runs/a'}" in out


@pytest.mark.slow
def test_submitit_local_job_with_a_relative_job_dir(toy_root, tmp_path, capsys, monkeypatch):
    import submitit_pretrain
    monkeypatch.chdir(tmp_path)
    job = submitit_pretrain.main(["--cluster", "local", "--ngpus", "1", "--nodes", "1", "--job_dir", "jobs/%j",
                                  "--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                                  "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers",
                                  "0", "--device", "cpu"])
    job.result()
    message = capsys.readouterr().out
    [folder] = os.listdir(tmp_path / "jobs")
    assert "%j" not in folder and "%j" not in message and str(tmp_path / "jobs" / folder) in message
    assert (tmp_path / "jobs" / folder / "checkpoint-0.pth").exists()  # given --job_dir alone, checkpoints go there


def test_slurm_flags_are_in_help_and_linprobe_has_its_script(toy_root, capsys):
    import submitit_finetune
    import submitit_linprobe
    import submitit_pretrain
    for module in (submitit_pretrain, submitit_finetune):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        assert "--cluster" in text and "--job_dir" in text
    assert "--linprobe" in text
    submitit_linprobe.main(["--dry_run", "--data_path", toy_root, "--job_dir", "/tmp/lp/%j"])
    assert "#SBATCH --job-name=mae_linprobe" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# what the user sees

def test_either_flag_spelling_works(toy_root, tmp_path):
    out = tmp_path / "o"
    argv = [a.replace("--output_dir", "--output-dir").replace("--batch_size", "--batch-size")
            for a in common(toy_root, out)]
    main_pretrain.cli(argv)
    assert (out / "checkpoint-0.pth").exists()


def test_ignored_flags_are_named_once(toy_root, tmp_path, capsys):
    main_pretrain.cli(common(toy_root, tmp_path / "a", "--mask_method", "segments", "--mask_ratio", "0.5"))
    assert capsys.readouterr().err.count("--mask_ratio is ignored by --mask_method segments") == 1
    main_pretrain.cli(common(toy_root, tmp_path / "b", "--coverage_ratio", "30"))
    assert "--coverage_ratio is ignored by --mask_method patches" in capsys.readouterr().err


def test_long_listings_go_to_files_and_progress_shows_the_run_eta(toy_root, tmp_path, capsys):
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out, "--epochs", "2"))
    printed = capsys.readouterr().out
    assert "Block(" not in printed and "Block(" in (out / "model.txt").read_text()
    assert "Namespace(" in (out / "args.txt").read_text() and "Namespace(" not in printed
    assert "(run 0:" in printed  # epoch 0 of 2: the whole run's ETA as well


def test_compare_needs_an_output_dir(capsys):
    import benchmark
    with pytest.raises(SystemExit) as exc:
        benchmark.cli(["compare"])
    assert exc.value.code == 2 and "--output-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.cli(["--help"])
    assert "benchmark.py compare --output-dir DIR" in capsys.readouterr().out


def test_miou_without_a_labelled_pixel_is_nan():
    from segmenter.metrics import ConfusionMatrix
    cm = ConfusionMatrix(3, torch.device("cpu"))
    cm.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 255, dtype=torch.long))
    with pytest.warns(RuntimeWarning, match="no valid"):
        scores = cm.compute()
    assert scores["mIoU"] != scores["mIoU"] and scores["pixel_accuracy"] != scores["pixel_accuracy"]


def test_run_benchmark_sh_keeps_its_recipe(tmp_path):
    import subprocess

    from conftest import REPO
    res = subprocess.run(["bash", "run_benchmark.sh", "--pretrain-args", "--blr 1"], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "EXTRA_PRETRAIN_ARGS" in res.stderr


def test_seg_loss_is_recorded_part_of_the_benchmark_identity_and_older_runs_keep_theirs(toy_root, tmp_path, capsys):
    import benchmark
    import evals.runs
    parser = benchmark.get_args_parser()
    base = ["--in1k-dir", "a", "--ade20k-dir", "b", "--mask-method", "segments"]
    ids = {}
    for extra in ([], ["--pretrain-args=--seg_loss pixel"], ["--pretrain-args=--seg-loss=patch"]):
        args = parser.parse_args(base + extra)
        benchmark.check_args(args, parser)
        ids[tuple(extra)] = (evals.runs.run_config(args)["seg_loss"], evals.runs.run_id(args))
    assert [v[0] for v in ids.values()] == ["pixel", "pixel", "patch"]
    assert len({v[1] for v in ids.values()}) == 3  # another flag string, another run
    # a run's checkpoints record the loss; a checkpoint from before --seg_loss continues with its per-patch loss
    out = tmp_path / "pre"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segments", "--epochs", "2", "--stop_epoch", "1"))
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=False)
    assert ckpt["args"].seg_loss == "pixel"
    del ckpt["args"].seg_loss
    torch.save(ckpt, out / "checkpoint-0.pth")
    capsys.readouterr()
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segments", "--epochs", "2"))
    assert "--seg_loss patch taken from" in capsys.readouterr().out
    assert torch.load(out / "checkpoint-1.pth", weights_only=False)["args"].seg_loss == "patch"
    assert run_exit_code(common(toy_root, out, "--mask_method", "segments", "--epochs", "3", "--seg_loss", "pixel",
                                "--resume", str(out / "checkpoint-0.pth")), main_pretrain.cli) == 1
    assert "predates --seg_loss" in capsys.readouterr().err


def test_an_auto_resume_reads_the_newest_checkpoint_once_and_the_others_never(toy_root, tmp_path, monkeypatch):
    """The run it continues is read once (one torch.load), with its flags reconciled and its states
    loaded from that read; the other checkpoints of the folder, also while --keep_last prunes,
    are judged without being loaded."""
    out = tmp_path / "o"
    flags = ["--mask_method", "segments", "--epochs", "5", "--save_freq", "1", "--keep_last", "2"]
    main_pretrain.cli(common(toy_root, out, *flags, "--stop_epoch", "3"))
    assert sorted(os.listdir(out)).count("checkpoint-0.pth") == 0  # pruned
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(os.path.basename(str(f))) or real(f, *a, **k))
    main_pretrain.cli(common(toy_root, out, *flags))
    assert loads == ["checkpoint-2.pth"]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-3.pth", "checkpoint-4.pth"]
