"""Users arriving with other codebases' habits: the reference's launcher, its eval command, SLURM
submissions checked before the queue, either flag spelling in every command, segmae's and
MAE-pytorch's flags and model names."""
import argparse
import importlib
import subprocess
import sys

import pytest
import torch

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


# ------------------------------------------------------------------------------------------------
# either spelling of every flag, in every command

class Parsed(Exception):
    """Raised with the namespace once a command has parsed its command line (nothing runs)."""


@pytest.fixture
def parse_only(monkeypatch):
    real = argparse.ArgumentParser.parse_known_args

    def parse_and_stop(self, args=None, namespace=None):
        namespace, extras = real(self, args, namespace)
        if extras:  # parse_args' own error for what no flag took
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise Parsed(namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_and_stop)


# command: (module, function, the flags it requires, a flag in the command's own spelling, its value,
# the parsed value); a command whose flags are all one word is listed with one of them
COMMANDS = {
    "main_pretrain.py": ("main_pretrain", "cli", [], "--output_dir", "o", "o"),
    "main_finetune.py": ("main_finetune", "cli", [], "--output_dir", "o", "o"),
    "main_linprobe.py": ("main_linprobe", "cli", [], "--output_dir", "o", "o"),
    "benchmark.py": ("benchmark", "cli", ["--in1k-dir", "a", "--ade20k-dir", "b"], "--output-dir", "o", "o"),
    "benchmark.py compare": ("benchmark", "cli", ["compare"], "--output-dir", "o", "o"),
    "submitit_pretrain.py": ("submitit_pretrain", "main", [], "--use_volta32", None, True),
    "submitit_finetune.py": ("submitit_finetune", "main", [], "--use_volta32", None, True),
    "submitit_linprobe.py": ("submitit_linprobe", "main", [], "--use_volta32", None, True),
    "submitit_masks.py": ("submitit_masks", "main", ["--data_path", "d"], "--use_volta32", None, True),
    "segmenter.train": ("segmenter.train", "cli", ["--dataset-dir", "a", "--log-dir", "b"], "--num-workers", "3", 3),
    "segmenter.prepare_ade20k": ("segmenter.prepare_ade20k", "main", [], "--keep-zip", None, True),
    "evals.knn": ("evals.knn", "cli", ["--checkpoint", "c", "--data_path", "d"], "--bank_per_class", "3", 3),
    "evals.probe": ("evals.probe", "cli", ["--checkpoint", "c", "--dataset-dir", "d"], "--num-workers", "3", 3),
    "tools/build_mask_cache.py": ("tools.build_mask_cache", "main", ["--data_path", "d"], "--mask_format", "json",
                                  "json"),
    "tools/check_dataset.py": ("tools.check_dataset", "main", ["--data_path", "d"], "--coverage_ratio", "30", 30.0),
    "tools/convert_masks.py": ("tools.convert_masks", "main", ["--data_path", "d"], "--coverage_ratio", "30", 30.0),
    "tools/export.py": ("tools.export", "main", ["--checkpoint", "c", "--to", "timm", "--out", "o"],
                        "--timm_zero_head", None, True),
    "tools/generate_masks.py": ("tools.generate_masks", "main", ["--data_path", "d"], "--sam_checkpoint", "s", "s"),
    "tools/make_toy_data.py": ("tools.make_toy_data", "main", [], "--train_per_class", "3", 3),
    "tools/sort_imagenet_val.py": ("tools.sort_imagenet_val", "main", ["--labels", "l"], "--val_dir", "v", "v"),
    "tools/visualize.py": ("tools.visualize", "main", [], "--patch_size", "8", 8),
    "tools/write_shards.py": ("tools.write_shards", "main", ["--data_path", "d", "--out", "o"],
                              "--samples_per_shard", "5", 5),
    "perf/bench_mask_cache.py": ("perf.bench_mask_cache", "main", [], "--images", "5", 5),
    "perf/dataset_startup.py": ("perf.dataset_startup", "main", [], "--images", "5", 5),
    "perf/loader_memory.py": ("perf.loader_memory", "main", [], "--images", "5", 5),
    "perf/mask_generation.py": ("perf.mask_generation", "main", [], "--points_per_side", "5", 5),
    "perf/loader_throughput.py": ("perf.loader_throughput", "main", ["--data_path", "d"], "--coverage_ratio", "30",
                                  30.0),
    "perf/perf_report.py": ("perf.perf_report", "main", ["--out", "o"], "--num_workers", "3", 3),
    "perf/probe_cost.py": ("perf.probe_cost", "main", [], "--crop-size", "64", 64),
    "perf/step_modules.py": ("perf.step_modules", "main", [], "--data_path", "d", "d"),
    "perf/throughput.py": ("perf.throughput", "main", [], "--batch_size", "3", 3),
}


def other_spelling(flag: str) -> str:
    name = flag[2:]
    return "--" + (name.replace("_", "-") if "_" in name else name.replace("-", "_"))


@pytest.mark.parametrize("spelling", ["own", "other", "other="])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_either_spelling_of_its_flags(command, spelling, parse_only):
    module, function, required, flag, value, expected = COMMANDS[command]
    spelt = flag if spelling == "own" else other_spelling(flag)
    given = [spelt] if value is None else ([f"{spelt}={value}"] if spelling == "other=" else [spelt, value])
    with pytest.raises(Parsed) as parsed:
        getattr(importlib.import_module(module), function)([*required, *given])
    dest = flag[2:].replace("-", "_")
    assert getattr(parsed.value.args[0], dest) == expected


def test_every_command_is_in_the_spelling_test():
    """Each file a user runs (an entry point, a tool, a measurement script) is listed above."""
    import glob
    import os
    listed = {c.split()[0] for c in COMMANDS} | {c.replace(".", "/") + ".py" for c in COMMANDS if "/" not in c}
    scripts = [os.path.relpath(f, REPO) for pattern in ("*.py", "tools/*.py", "perf/*.py", "evals/*.py",
                                                         "segmenter/*.py")
               for f in glob.glob(os.path.join(REPO, pattern)) if "__main__" in open(f).read()]
    assert sorted(set(scripts) - listed) == []


# ------------------------------------------------------------------------------------------------
# benchmark.py --num-gpus on a machine without (enough) GPUs

def test_benchmark_on_gpus_that_are_not_there_is_refused_as_device_cuda_is(toy_root, toy_ade20k, tmp_path, capsys,
                                                                           count_stages, monkeypatch):
    import benchmark
    import main_pretrain
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main_pretrain.cli(["--device", "cuda", "--data_path", toy_root, "--output_dir", ""])
    device_line = capsys.readouterr().err.strip().splitlines()[-1]
    base = ["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(tmp_path / "b"),
            "--pretrain-args", "--amp bf16"]
    with pytest.raises(SystemExit) as e:
        benchmark.cli([*base, "--num-gpus", "8"])
    assert e.value.code == 1 and count_stages == [] and not (tmp_path / "b").exists()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "ERROR: --num-gpus 8 was asked for but no GPU is visible; use --num-gpus 1 (one process on the CPU)"
    assert device_line == "ERROR: --device cuda was asked for but no GPU is visible; use --device cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit):
        benchmark.cli([*base, "--num-gpus", "8"])
    assert "--num-gpus 8: only 2 GPU(s) are visible; pass --num-gpus 2 or fewer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.cli([*base, "--num-gpus", "2", "--gpu", "1"])
    assert "--num-gpus 2: only 1 GPU(s) are visible" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# SLURM submissions: what the job would find wrong at its start is found before the queue

@pytest.fixture
def no_submission(monkeypatch):
    """submitit's executor, recording whether a job was made (the local and SLURM paths alike)."""
    import submitit
    made = []

    class Recording:
        def __init__(self, **kwargs):
            made.append(kwargs)
            raise RuntimeError("a job would have been submitted")

    monkeypatch.setattr(submitit, "AutoExecutor", Recording)
    return made


@pytest.mark.parametrize("script", ["submitit_finetune", "submitit_linprobe"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_finetune_checkpoint_that_does_not_fit_is_refused_before_submitting(script, dry_run, toy_root, pretrained,
                                                                              tmp_path, capsys, no_submission):
    mod = importlib.import_module(script)
    argv = ["--job_dir", str(tmp_path / "%j"), "--data_path", toy_root, "--finetune", pretrained["segments"],
            "--model", "vit_small_patch8", "--input_size", "32", "--cluster", "local", "--ngpus", "1", "--nodes", "1",
            *(["--dry_run"] if dry_run else [])]
    with pytest.raises(SystemExit) as e:
        runsetup.run_tool(mod.main, argv)
    assert e.value.code == 1 and no_submission == []
    out = capsys.readouterr()
    assert "#SBATCH" not in out.out
    [line] = out.err.strip().splitlines()
    assert "does not fit this model" in line and "(fits --model vit_tiny_patch8)" in line


def test_submitit_checks_data_and_files_before_submitting(toy_root, toy_ade20k, pretrained, tmp_path, capsys,
                                                          no_submission):
    import submitit_finetune
    import submitit_pretrain
    jobs = ["--job_dir", str(tmp_path / "%j"), "--cluster", "local", "--ngpus", "1", "--nodes", "1"]
    cases = [
        (submitit_pretrain, ["--data_path", toy_ade20k, "--mask_method", "segments"],
         f"--data_path {toy_ade20k} has no masks/ folder, which --mask_method segments needs"),
        (submitit_pretrain, ["--data_path", str(tmp_path / "nowhere")], "does not exist or is not a folder"),
        (submitit_pretrain, ["--data_path", toy_root, "--resume", str(tmp_path / "ck.pth")],
         f"--resume {tmp_path / 'ck.pth'} does not exist"),
        (submitit_finetune, ["--data_path", toy_ade20k, "--finetune", pretrained["segments"]],
         f"--data_path {toy_ade20k} has no train/ folder"),
        (submitit_finetune, ["--data_path", toy_root, "--finetune", str(tmp_path / "ck.pth")],
         f"--finetune {tmp_path / 'ck.pth'} does not exist"),
        (submitit_finetune, ["--data_path", toy_root, "--eval", "--resume", pretrained["segments"]],
         "is a pretraining checkpoint, not a finetuned or probed one"),
    ]
    for mod, argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            runsetup.run_tool(mod.main, [*jobs, *argv])
        assert e.value.code == 1 and no_submission == [], argv
        assert expected in capsys.readouterr().err, argv
    # what fits is submitted
    with pytest.raises(RuntimeError, match="would have been submitted"):
        submitit_finetune.main([*jobs, "--data_path", toy_root, "--finetune", pretrained["segments"],
                                "--model", "vit_tiny_patch8", "--input_size", "32"])
    assert len(no_submission) == 1


# ------------------------------------------------------------------------------------------------
# the original segmae code's and MAE-pytorch's habits get this repo's way

HABITS = [
    ("benchmark", "cli", ["--in1k-dir=IN"],
     "--ade20k-dir is required: the original segmae downloaded ADE20k itself; here it is prepared once with "
     "python -m segmenter.prepare_ade20k --out data"),
    ("benchmark", "cli", ["--in1k-dir", "IN", "--ade20k-dir", "ADE", "--stack"], "--stack takes the checkpoint"),
    ("benchmark", "cli", ["--in1k-dir", "IN", "--ade20k-dir", "ADE", "--stack", "--eval", "3"],
     "benchmark.py also takes --stack official"),
    ("main_pretrain", "cli", ["--stack"], "pass that file"),
    ("main_pretrain", "cli", ["--decoder_depth", "8"], "--decoder_depth: the decoder is part of --model here"),
    ("submitit_pretrain", "main", ["--decoder-depth=8"], "--decoder-depth: the decoder is part of --model here"),
    ("submitit_pretrain", "main", ["--local"], "--local: pass --cluster local to run the job on this machine"),
    ("submitit_linprobe", "main", ["--local"], "--local: pass --cluster local"),
]


@pytest.mark.parametrize("module,function,argv,hint", HABITS)
def test_segmae_habits_are_answered_with_this_repos_way(module, function, argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), function)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert hint in err, err[-600:]
    assert "ambiguous option" not in err and "the following arguments are required" not in err


def test_a_segmae_flag_in_the_benchmarks_pretraining_flags_gets_the_hint(toy_root, toy_ade20k, tmp_path, capsys,
                                                                         count_stages):
    import benchmark
    with pytest.raises(SystemExit) as e:
        benchmark.cli(["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(tmp_path / "b"),
                       "--pretrain-args", "--decoder_depth 8"])
    assert e.value.code == 1 and count_stages == []
    assert "--pretrain-args '--decoder_depth 8': --decoder_depth: the decoder is part of --model" in \
        capsys.readouterr().err


@pytest.mark.parametrize("module,given,ours", [
    ("main_pretrain", "pretrain_mae_base_patch16_224", "mae_vit_base_patch16"),
    ("main_pretrain", "pretrain_mae_small_patch16_224", "mae_vit_small_patch16"),
    ("main_finetune", "vit_base_patch16_224", "vit_base_patch16"),
    ("main_linprobe", "vit_large_patch16_224", "vit_large_patch16"),
    ("main_finetune", "mae_vit_tiny_patch8", "vit_tiny_patch8"),
    ("benchmark", "pretrain_mae_large_patch16_224", "mae_vit_large_patch16"),
])
def test_mae_pytorch_model_names_map_to_ours_with_a_note(module, given, ours, capsys):
    from run.flags import parse_flags
    mod = importlib.import_module(module)
    parser = mod.get_args_parser()
    required = ["--in1k-dir", "a", "--ade20k-dir", "b"] if module == "benchmark" else []
    args = parse_flags(parser, [*required, "--model", given])
    mod.check_args(args, parser)
    assert args.model == ours
    out = capsys.readouterr().out
    assert f"NOTE: --model {given}" in out and ours in out


@pytest.mark.parametrize("flag", ["--local-rank=1", "--local_rank=1"])
def test_mask_generation_accepts_the_launchers_local_rank(flag, parse_only):
    """tools/generate_masks.py shards its images over the launcher's ranks (read from RANK)."""
    from tools import generate_masks
    with pytest.raises(Parsed) as parsed:
        generate_masks.main(["--data_path", "d", flag])
    assert parsed.value.args[0].local_rank == 1
