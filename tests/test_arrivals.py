"""Users arriving with other codebases' habits: the reference's launcher, its eval command, SLURM
submissions checked before the queue, either flag spelling in every command, segmae's and
MAE-pytorch's flags and model names."""
import importlib
import subprocess
import sys

import pytest

import run.setup as runsetup
from conftest import REPO
from run.distributed import PER_RANK_FLAGS

# ------------------------------------------------------------------------------------------------
# both launchers start every command that takes ranks


def launcher_commands(toy_root, toy_ade20k, pretrained, out):
    """Each entry point that takes ranks, with the least work that passes its ranks check."""
    tiny = ["--num_workers", "0", "--device", "cpu", "--epochs", "1", "--warmup_epochs", "0"]
    return {
        "main_pretrain": ["main_pretrain.py", "--data_path", toy_root, "--model", "mae_vit_tiny_patch8",
                          "--input_size", "32", "--batch_size", "16", "--mask_method", "segments",
                          "--output_dir", str(out), *tiny],
        "main_finetune": ["main_finetune.py", "--data_path", toy_root, "--model", "vit_tiny_patch8",
                          "--input_size", "32", "--nb_classes", "4", "--batch_size", "16",
                          "--finetune", pretrained["segments"], "--output_dir", str(out), *tiny],
        "main_linprobe": ["main_linprobe.py", "--data_path", toy_root, "--model", "vit_tiny_patch8",
                          "--input_size", "32", "--nb_classes", "4", "--batch_size", "16",
                          "--finetune", pretrained["segments"], "--output_dir", str(out), *tiny],
        "segmenter.train": ["-m", "segmenter.train", "--dataset-dir", toy_ade20k, "--backbone", "vit_tiny_patch8",
                            "--decoder", "linear", "--crop-size", "32", "--num-workers", "0", "--device", "cpu",
                            "--mae-chp", pretrained["segments"], "--eval-only", "--log-dir", str(out)],
        "evals.knn": ["-m", "evals.knn", "--checkpoint", pretrained["segments"], "--data_path", toy_root,
                      "--bank_per_class", "4", "--num_workers", "0", "--device", "cpu"],
        "evals.probe": ["-m", "evals.probe", "--checkpoint", pretrained["segments"], "--dataset-dir", toy_ade20k,
                        "--crop-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
                        "--device", "cpu"],
    }


ENTRY_POINTS = ["main_pretrain", "main_finetune", "main_linprobe", "segmenter.train", "evals.knn", "evals.probe"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_torch_distributed_launch_starts_every_command(entry, toy_root, toy_ade20k, pretrained, tmp_path):
    """torch.distributed.launch (facebookresearch/mae's FINETUNE.md, Union14M's pretraining) gives
    each of its 2 gloo ranks its own --local-rank: a per-rank flag, not a disagreement."""
    command = launcher_commands(toy_root, toy_ade20k, pretrained, tmp_path / "out")[entry]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--standalone",
                          "--nproc_per_node=2", *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "disagree" not in res.stderr
    assert "distributed init (rank 0/2, gloo)" in res.stdout


@pytest.mark.parametrize("flag", ["--local-rank=1", "--local_rank=1"])
@pytest.mark.parametrize("module", ["main_pretrain", "main_finetune", "main_linprobe", "segmenter.train",
                                    "evals.knn", "evals.probe"])
def test_every_command_that_takes_ranks_accepts_the_launchers_local_rank(module, flag):
    """The launcher's flag parses in each command (its value is not compared between ranks)."""
    parsed = {}
    mod = importlib.import_module(module)
    required = {"main_pretrain": [], "main_finetune": [], "main_linprobe": [],
                "segmenter.train": ["--dataset-dir", "x", "--log-dir", "y"],
                "evals.knn": ["--checkpoint", "x", "--data_path", "y"],
                "evals.probe": ["--checkpoint", "x", "--dataset-dir", "y"]}[module]
    runsetup.run_cli(mod.get_args_parser(), lambda args, parser: None, lambda args: parsed.update(vars(args)),
                     [*required, flag])
    assert parsed["local_rank"] == 1
    assert "local_rank" in PER_RANK_FLAGS


# ------------------------------------------------------------------------------------------------
# --eval --resume of a pretraining checkpoint (segmae's run_eval.sh)

@pytest.mark.parametrize("script,extra", [("main_finetune", []), ("main_finetune", ["--model", "vit_tiny_patch8"]),
                                          ("main_linprobe", [])])
def test_eval_of_a_pretraining_checkpoint_names_the_commands_that_evaluate_it(script, extra, toy_root, pretrained,
                                                                              tmp_path, capsys):
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.cli(["--eval", "--resume", pretrained["segments"], "--data_path", toy_root, "--num_workers", "0",
                 "--device", "cpu", "--output_dir", str(tmp_path / "out"), *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{pretrained['segments']} is a pretraining checkpoint" in err[0]
    assert (f"python {script}.py --finetune {pretrained['segments']} --model vit_tiny_patch8 --data_path {toy_root}"
            in err[0])
    assert f"python -m evals.knn --checkpoint {pretrained['segments']} --data_path {toy_root}" in err[0]
    assert "mae_vit_tiny_patch8" not in err[0]  # not advised: the script does not take it


def test_an_official_encoder_only_file_given_to_resume_is_a_pretraining_checkpoint(toy_root, pretrained, tmp_path,
                                                                                   capsys):
    """The official mae_pretrain_vit_*.pth hold the encoder alone (no decoder, no head)."""
    import torch

    import main_finetune
    sd = torch.load(pretrained["patches"], weights_only=False)["model"]
    official = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}}, official)
    with pytest.raises(SystemExit):
        main_finetune.cli(["--eval", "--resume", str(official), "--data_path", toy_root, "--num_workers", "0",
                           "--device", "cpu", "--output_dir", "", "--model", "vit_tiny_patch8", "--input_size", "32"])
    assert f"{official} is a pretraining checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# an encoder that does not fit names the flag of the command at hand

@pytest.mark.parametrize("module", ["segmenter.train", "evals.probe"])
def test_an_encoder_that_does_not_fit_names_the_backbone_flag(module, toy_ade20k, pretrained, tmp_path, capsys):
    mod = importlib.import_module(module)
    if module == "segmenter.train":
        argv = ["--dataset-dir", toy_ade20k, "--log-dir", str(tmp_path / "seg"), "--backbone", "vit_small_patch8",
                "--decoder", "linear", "--crop-size", "32", "--num-workers", "0", "--device", "cpu",
                "--mae-chp", pretrained["patches"], "--epochs", "1"]
    else:
        argv = ["--checkpoint", pretrained["patches"], "--dataset-dir", toy_ade20k, "--backbone", "vit_small_patch8",
                "--crop-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        mod.cli(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "fits --backbone vit_tiny_patch8" in err and "--model" not in err, err


def test_stack_of_an_encoder_that_does_not_fit_names_the_pretraining_model(toy_root, pretrained, tmp_path, capsys):
    import main_pretrain
    with pytest.raises(SystemExit):
        main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_small_patch8", "--input_size", "32",
                           "--stack", pretrained["patches"], "--num_workers", "0", "--device", "cpu", "--batch_size", "8",
                           "--epochs", "1", "--output_dir", str(tmp_path / "o")])
    assert "fits --model mae_vit_tiny_patch8" in capsys.readouterr().err
