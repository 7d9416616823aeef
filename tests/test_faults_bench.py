"""Issue 46, the benchmark's, the results' and the tools' items: every outcome is a correct result
or one line naming the problem and the fix, with nothing lost (docs/RELIABILITY.md, "The
benchmark's data, results and tools"). The benchmark tests share one half-finished run, made once
(one pretraining epoch and one Segmenter epoch on the toy data) and copied per test."""
import argparse
import json
import multiprocessing
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
import torch
from test_benchmark import bench_args
from test_faults import mounted_tmpfs
from test_mask_layouts import rect, segmae_root

import benchmark
import evals.knn
import evals.report
import evals.runs
import main_pretrain
import submitit_pretrain
from inputs.folders import scan_image_folder
from inputs.images import DataError
from run.files import StorageError
from sam.cache import MaskCache
from sam.files import MaskFileError
from segmenter import prepare_ade20k
from tools import check_dataset, convert_masks, export, sort_imagenet_val, visualize
from util.misc import UserError


def exit_code(cli, argv):
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    return exc.value.code


@pytest.fixture
def fs_64k(tmp_path):
    """A real 64 KB file system (skipped where it cannot be mounted), unmounted after the test."""
    yield from mounted_tmpfs(tmp_path / "fs64k", "64k")


@pytest.fixture
def fs_64m(tmp_path):
    yield from mounted_tmpfs(tmp_path / "fs64m", "64m")


@pytest.fixture
def no_stage(monkeypatch):
    """Fails the test as soon as the benchmark starts a stage."""
    def started(module, *a, **k):
        raise AssertionError(f"the stage {module} started")
    monkeypatch.setattr(benchmark, "run_stage", started)


# ---- 1. tools/sort_imagenet_val.py: class names that leave val/, moves planned first ---------------

def flat_val(toy_root, tmp_path):
    """A copy of the toy val/ as the official tarball has it (images directly inside); returns
    (val folder, [(image name, its class)])."""
    val = tmp_path / "val"
    shutil.copytree(os.path.join(toy_root, "val"), val)
    pairs = []
    for c in sorted(os.listdir(val)):
        for f in sorted(os.listdir(val / c)):
            name = f"ILSVRC2012_val_{len(pairs) + 1:08d}.png"
            os.replace(val / c / f, val / name)
            pairs.append((name, c))
        os.rmdir(val / c)
    return val, pairs


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*"))


@pytest.mark.parametrize("bad", ["../../x", "ABSOLUTE", "..", ".hidden", "a/b", "x\\y"])
def test_sort_val_refuses_a_class_name_that_is_not_one_folder(toy_root, tmp_path, bad):
    val, pairs = flat_val(toy_root, tmp_path / "data")
    bad = str(tmp_path / "outside") if bad == "ABSOLUTE" else bad
    labels = tmp_path / "LOC_val_solution.csv"
    rows = [f"{os.path.splitext(n)[0]},{bad if i == 5 else c} 1 2 3 4" for i, (n, c) in enumerate(pairs)]
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    before = tree(tmp_path)
    for extra in ([], ["--dry_run"]):
        with pytest.raises(UserError, match="is not a plain folder name.*nothing was moved"):
            sort_imagenet_val.main(["--val_dir", str(val), "--labels", str(labels), *extra])
    assert tree(tmp_path) == before  # nothing moved, in val/ or outside it


def test_sort_val_plans_every_move_before_the_first(toy_root, tmp_path):
    val, pairs = flat_val(toy_root, tmp_path)
    labels = tmp_path / "labels.txt"
    # the last image's class is its own name: its folder cannot be made while it is there
    classes = [c for _, c in pairs[:-1]] + [pairs[-1][0]]
    labels.write_text("".join(f"{n} {c}\n" for (n, _), c in zip(pairs, classes)))
    before = tree(val)
    with pytest.raises(UserError, match=r"1 of 8 images cannot be sorted.*would be a file.*nothing was moved"):
        sort_imagenet_val.main(["--val_dir", str(val), "--labels", str(labels)])
    assert tree(val) == before  # val/ is not half sorted
    # an image of the same name already in its class folder is not overwritten
    labels.write_text("".join(f"{n} {c}\n" for n, c in pairs))
    (val / pairs[3][1]).mkdir()
    (val / pairs[3][1] / pairs[3][0]).write_bytes(b"another file")
    with pytest.raises(UserError, match="already exists"):
        sort_imagenet_val.main(["--val_dir", str(val), "--labels", str(labels)])
    assert (val / pairs[3][1] / pairs[3][0]).read_bytes() == b"another file" and (val / pairs[0][0]).exists()
    os.remove(val / pairs[3][1] / pairs[3][0])
    assert sort_imagenet_val.main(["--val_dir", str(val), "--labels", str(labels), "--copy"]) == 0
    assert sort_imagenet_val.main(["--val_dir", str(val), "--labels", str(labels), "--copy"]) == 0  # done already
    assert len(scan_image_folder(str(val)).samples) == 8


# ---- 5. every path in a command the repo prints is quoted --------------------------------------------

WEIRD = "data $(touch pwned) it's"


def test_convert_masks_mv_command_runs_as_printed(tmp_path, capsys):
    m = rect(32, 32, 0, 16, 0, 16)
    root = tmp_path / WEIRD
    os.rename(segmae_root(tmp_path, {"a.png": (32, 32), "b.png": (32, 32)}, {"a.png": [(25.0, m)], "b.png": [(25.0, m)]}),
              root)
    convert_masks.main(["--data_path", str(root), "--workers", "1"])
    # (after an in-process entry point, print may carry timestamps: the command is what follows the words)
    [command] = [x.split("To train on them: ", 1)[1] for x in capsys.readouterr().out.splitlines()
                 if "To train on them: " in x]
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True)
    assert not (tmp_path / "pwned").exists()  # nothing but the two moves ran
    # the converted masks are masks/, the old ones beside it (masks/ already SAM's JSON: nothing to convert,
    # tests/test_first_contact_files.py)
    assert sorted(os.listdir(root)) == ["masks", "masks_segmae", "train"]
    assert sorted(os.listdir(root / "masks" / "c")) == ["a.json", "b.json"]
    assert sorted(os.listdir(root / "masks_segmae" / "c")) == ["a", "b"]


def command_words(text: str, start: str, n: int) -> list[str]:
    """The first n words of the command that begins with ``start`` in a message, as a shell splits it."""
    lexer = shlex.shlex(text[text.index(start):], posix=True, punctuation_chars=")")
    return [next(lexer) for _ in range(n)]


def test_every_printed_command_quotes_its_paths(toy_root, toy_ade20k, tmp_path, capsys):
    weird = tmp_path / WEIRD
    weird.mkdir()
    # benchmark.py: a run of the earlier layout, with the command that moves it
    out = weird / "bench"
    old = out / "pretrain_output" / "segments"
    old.mkdir(parents=True)
    torch.save({"model": {}, "epoch": 0, "args": argparse.Namespace(model="mae_vit_tiny_patch8", epochs=2, seed=0,
                                                                     coverage_ratio=30.0)}, old / "checkpoint-0.pth")
    assert exit_code(benchmark.cli, bench_args(toy_root, toy_ade20k, out)) == 1
    words = command_words(capsys.readouterr().err, "mv ", 3)
    assert words[:2] == ["mv", str(old)] and words[2].startswith(str(out / "pretrain_output" / "segments-cov30-"))
    # the flat val/ hint
    val = weird / "val"
    val.mkdir()
    shutil.copy(next(pathlib.Path(toy_root, "val").rglob("*.png")), val / "a.png")
    with pytest.raises(DataError) as e:
        scan_image_folder(str(val))
    assert command_words(str(e.value), "python tools/", 4)[2:] == ["--val_dir", str(val)]
    # the mask cache's rebuild command
    (weird / "masks_cache").mkdir()
    (weird / "masks_cache" / "coverage_50.npz").write_bytes(b"garbage")
    (weird / "masks_cache" / "coverage_50.bin").write_bytes(b"garbage")
    with pytest.raises(MaskFileError) as e:
        MaskCache(str(weird), 50.0)
    assert command_words(str(e.value), "python tools/", 4)[2:] == ["--data_path", str(weird)]
    # segmenter.prepare_ade20k: the rm -r of an incomplete folder
    (weird / "ADEChallengeData2016").mkdir()
    with pytest.raises(SystemExit) as e:
        prepare_ade20k.link_folder(toy_ade20k, str(weird), str(weird / "ADEChallengeData2016"))
    assert command_words(str(e.value), "rm -r ", 3) == ["rm", "-r", str(weird / "ADEChallengeData2016")]
    # the sbatch script of --dry_run runs the job folder's command in a shell
    submitit_pretrain.main(["--dry_run", "--job_dir", str(weird / "jobs" / "%j"), "--data_path", toy_root,
                            "--model", "mae_vit_tiny_patch8", "--input_size", "32"])
    [line] = [x for x in capsys.readouterr().out.splitlines() if "submitit.core._submit" in x]
    assert shlex.split(line)[-1] == str(weird / "jobs" / "%j")


# ---- 7, 8, 25. results.jsonl: concurrent writers, lines that are not rows ---------------------------

def _append_rows(path, writer, n, start):
    start.wait()
    for i in range(n):
        evals.runs.append_result(path, {"run_id": f"w{writer}", "eval_id": "e", "method": "patches",
                                        "coverage_ratio": None, "epochs": i, "mIoU": 1.0, "pixel_accuracy": 2.0,
                                        "config": {"pad": "x" * 300}})


def test_two_processes_appending_results_lose_no_row(tmp_path):
    path = str(tmp_path / "results.jsonl")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    writers = [ctx.Process(target=_append_rows, args=(path, w, 150, start)) for w in range(2)]
    for p in writers:
        p.start()
    start.set()
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    rows = [json.loads(line) for line in open(path)]
    assert sorted((r["run_id"], r["epochs"]) for r in rows) == [(f"w{w}", i) for w in range(2) for i in range(150)]


def test_lines_that_are_not_rows_are_kept_and_left_out(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    good = [{"run_id": "r", "eval_id": "e", "method": "patches", "coverage_ratio": None, "epochs": e, "mIoU": 10.0 + e,
             "pixel_accuracy": 50.0} for e in (1, 2)]
    bad = ['{"run_id": "r", "epochs": 3, "mIoU": 1', "[1, 2]", '"a string"', '{"mIoU": 3.0}',
           '{"run_id": "r", "method": "patches", "epochs": "abc", "mIoU": 1, "pixel_accuracy": 1}']
    path.write_text(json.dumps(good[0]) + "\n" + "\n".join(bad) + "\n" + json.dumps(good[1]) + "\n")
    evals.runs.append_result(str(path), {**good[0], "epochs": 4})
    evals.runs.append_result(str(path), good[1])  # a duplicate: not added
    lines = path.read_text().splitlines()
    assert lines[1:6] == bad and len(lines) == 8  # every line kept as it was, one row added
    out = capsys.readouterr().out
    assert "line 2 is not JSON" in out and "line 3 is not a results row (a JSON list, not an object)" in out
    rows = evals.report.read_results(str(tmp_path))
    assert [r["epochs"] for r in rows] == [1, 2, 4]
    capsys.readouterr()
    benchmark.compare_cli(["--output-dir", str(tmp_path)])  # the table and the plot from the rows there are
    out = capsys.readouterr().out
    assert "line 6 is not a results row ('epochs' is missing or not a whole number)" in out and "12.00" in out
    # a torn last line (a crash mid-append) keeps a line of its own
    with open(path, "a") as f:
        f.write('{"run_id": "r", "ep')
    evals.runs.append_result(str(path), {**good[0], "epochs": 5})
    assert path.read_text().splitlines()[-2:] == ['{"run_id": "r", "ep', json.dumps({**good[0], "epochs": 5})]


def test_a_full_disk_at_the_results_row_is_one_line(fs_64k):
    (fs_64k / "filler").write_bytes(b"\0" * (64 * 1024 - 100))
    with pytest.raises(StorageError, match=r"could not write .*results.jsonl: No space left on device"):
        evals.runs.append_result(str(fs_64k / "results.jsonl"), {"run_id": "r", "method": "m", "epochs": 1,
                                                                 "mIoU": 1.0, "pixel_accuracy": 1.0,
                                                                 "pad": "x" * 200_000})


@pytest.mark.parametrize("content", ["[]", '"x"', '{"pretrain_1": 5}', '{"pretrain_1": {"seconds": "abc"}}', "{"])
def test_stage_times_of_the_wrong_type(tmp_path, capsys, content):
    (tmp_path / "stage_times.json").write_text(content)
    assert evals.runs.add_stage_time(str(tmp_path), "pretrain_1", 2.5) == {"seconds": 2.5, "invocations": 1}
    assert (tmp_path / "stage_times.json.unreadable").read_text() == content  # kept, not overwritten
    assert "stage_times.json" in capsys.readouterr().out
    assert evals.runs.stage_times(str(tmp_path)) == {"pretrain_1": {"seconds": 2.5, "invocations": 1}}


# ---- 9, 25, 26. the benchmark: its data, its results rows, its checks before the first stage -----------

@pytest.fixture(scope="module")
def half_done(toy_root, toy_ade20k, tmp_path_factory):
    """A benchmark stopped after its first chunk and that chunk's evaluation (of two), on private
    copies of the toy data: (data folder, ADE20k folder, output folder)."""
    base = tmp_path_factory.mktemp("half_done")
    data, ade, out = base / "in1k", base / "ade", base / "bench"
    shutil.copytree(toy_root, data)
    shutil.copytree(toy_ade20k, ade)
    real = benchmark.pretrain_until

    def stop_before_chunk_2(epochs, args, stack):
        if epochs == 2:
            raise KeyboardInterrupt
        return real(epochs, args, stack)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmark, "pretrain_until", stop_before_chunk_2)
        with pytest.raises(KeyboardInterrupt):
            benchmark.cli(half_args(data, ade, out))
    return data, ade, out


def half_args(data, ade, out, *extra):
    return bench_args(str(data), str(ade), out, "--pretrain-epochs", "2", *extra)


@pytest.fixture
def bench_copy(half_done, tmp_path):
    data, ade, out = half_done
    shutil.copytree(out, tmp_path / "bench")
    return data, ade, tmp_path / "bench"


def copy_without_one(src, dst, subfolder):
    shutil.copytree(src, dst)
    victim = sorted(p for p in (dst / subfolder).rglob("*") if p.is_file())[0]
    victim.unlink()
    return dst


def test_the_run_is_tied_to_its_pretraining_data(bench_copy, tmp_path, capsys, no_stage):
    data, ade, out = bench_copy
    config = json.loads(next((out / "pretrain_output").glob("*/config.json")).read_text())
    assert config["data"]["in1k_dir"]["path"] == str(data) and config["data"]["in1k_dir"]["files"]["images"] == 32
    row = json.loads((out / "results.jsonl").read_text())
    assert row["data"]["in1k_dir"] == config["data"]["in1k_dir"] and row["data"]["ade20k_dir"]["path"] == str(ade)
    # fewer images (the old results were reported as done; chunk 2 was pretrained on them)
    fewer = copy_without_one(data, tmp_path / "fewer", "train")
    assert exit_code(benchmark.cli, half_args(fewer, ade, out)) == 1
    err = capsys.readouterr().err
    assert f"was made on --in1k-dir {data} (32 images" in err and f"not on {fewer} (31 images" in err
    assert f"pass --in1k-dir {data} to continue it, or use another --output-dir" in err
    # the same file list in another folder, the first still there
    same = tmp_path / "same"
    shutil.copytree(data, same)
    assert exit_code(benchmark.cli, half_args(same, ade, out)) == 1
    assert "the same file list, but another folder" in capsys.readouterr().err


def test_a_changed_data_folder_is_refused_and_moved_data_continues(bench_copy, tmp_path, capsys, no_stage):
    data, ade, out = bench_copy
    config_path = next((out / "pretrain_output").glob("*/config.json"))
    config = json.loads(config_path.read_text())
    # the recorded folder now holds another file list
    config["data"]["in1k_dir"]["files"]["images"] = 33
    config_path.write_text(json.dumps(config))
    assert exit_code(benchmark.cli, half_args(data, ade, out)) == 1
    assert f"--in1k-dir {data} changed since the run" in capsys.readouterr().err
    # the run was made where there is nothing now, on the same file list: the data moved
    config["data"]["in1k_dir"].update(path=str(tmp_path / "gone"), files={**config["data"]["in1k_dir"]["files"],
                                                                          "images": 32})
    config_path.write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="the stage main_pretrain started"):  # continues: chunk 2
        benchmark.cli(half_args(data, ade, out))
    assert "which is gone" in capsys.readouterr().out
    assert json.loads(config_path.read_text())["data"]["in1k_dir"]["path"] == str(data)


def test_an_evaluation_is_tied_to_its_ade20k(bench_copy, tmp_path, capsys, no_stage):
    data, ade, out = bench_copy
    fewer = copy_without_one(ade, tmp_path / "ade_fewer", "images/validation")
    for argv in (half_args(data, fewer, out), half_args(data, fewer, out, "--eval", "1")):
        assert exit_code(benchmark.cli, argv) == 1
        err = capsys.readouterr().err
        assert "the evaluation" in err and f"was made on --ade20k-dir {ade}" in err and "val 5 images" in err
    same = tmp_path / "ade_same"
    shutil.copytree(ade, same)
    assert exit_code(benchmark.cli, half_args(data, same, out, "--eval", "1")) == 1
    assert "the same file list, but another folder" in capsys.readouterr().err
    # a run without records (an earlier version's) keeps working, checked by the path it recorded
    for record in out.rglob("data.json"):
        record.unlink()
    config_path = next((out / "pretrain_output").glob("*/config.json"))
    config = json.loads(config_path.read_text())
    del config["data"]
    config_path.write_text(json.dumps(config))
    done = next(out.rglob("done.json"))
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "data"}))
    assert benchmark.cli(half_args(data, ade, out, "--eval", "1"))[0]["epochs"] == 1
    assert exit_code(benchmark.cli, half_args(same, ade, out)) == 1  # another folder than the one recorded
    assert f"was made on --in1k-dir {data} (its file list not recorded)" in capsys.readouterr().err


def test_results_rows_that_are_no_rows_after_the_segmenter_stage(bench_copy, capsys, no_stage):
    data, ade, out = bench_copy
    with open(out / "results.jsonl", "a") as f:
        f.write('[1, 2]\n{"mIoU": 3}\n')
    rows = benchmark.cli(half_args(data, ade, out, "--eval", "1"))  # "already done", then the table
    assert [r["epochs"] for r in rows] == [1]
    assert "line 2 is not a results row" in capsys.readouterr().out
    assert (out / "results.jsonl").read_text().splitlines()[1:] == ["[1, 2]", '{"mIoU": 3}']
    done = next(out.rglob("done.json"))
    done.write_text("[]")
    assert exit_code(benchmark.cli, half_args(data, ade, out, "--eval", "1")) == 1
    assert f"{done} (a finished evaluation) holds a list, not a JSON object" in capsys.readouterr().err


def test_every_later_stage_input_is_checked_before_the_first(toy_root, toy_ade20k, tmp_path, capsys, no_stage):
    out = tmp_path / "bench"
    flat = tmp_path / "flat"
    shutil.copytree(toy_root, flat)
    flat_val(toy_root, flat / "tmp")  # a flat copy of val/ replaces the sorted one
    shutil.rmtree(flat / "val")
    os.replace(flat / "tmp" / "val", flat / "val")
    assert exit_code(benchmark.cli, bench_args(str(flat), toy_ade20k, out, "--knn-eval")) == 1
    assert "--knn-eval (kNN reads --in1k-dir's train/ and val/)" in capsys.readouterr().err
    assert exit_code(benchmark.cli, bench_args(toy_root, toy_ade20k, out, "--knn-eval",
                                               "--knn-bank-per-class", "-5")) == 2
    assert "--knn-bank-per-class: must be a positive integer" in capsys.readouterr().err
    for knn_args, message in (("--temperature 0", "--temperature: must be a finite number > 0"),
                              ("--k 0", "--bank_per_class and --k must be positive"),
                              ("--input_size 36", "--input_size 36 36 does not fit mae_vit_tiny_patch8"),
                              ("--seed 3", "sets --seed (use the benchmark's --seed)")):
        assert exit_code(benchmark.cli, bench_args(toy_root, toy_ade20k, out, "--knn-eval",
                                                   "--knn-args", knn_args)) == 1
        assert message in capsys.readouterr().err
    ade = tmp_path / "ade"
    shutil.copytree(toy_ade20k, ade)
    shutil.rmtree(ade / "annotations" / "validation")
    assert exit_code(benchmark.cli, bench_args(toy_root, str(ade), out)) == 1
    assert "has no annotations/validation/" in capsys.readouterr().err
    assert not (out / "pretrain_output").exists()


def test_an_empty_output_dir_is_refused(toy_root, toy_ade20k, capsys):
    assert exit_code(benchmark.cli, bench_args(toy_root, toy_ade20k, "")) == 2
    assert "--output-dir is empty" in capsys.readouterr().err


# ---- 19, 25. values that make results meaningless, sizes that do not fit, full disks ------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_patches")
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                       "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
                       "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu", "--mask_method", "patches"])
    return str(out / "checkpoint-0.pth")


@pytest.mark.parametrize("temperature", ["0", "nan", "-0.07", "inf"])
def test_knn_refuses_a_meaningless_temperature(tiny_checkpoint, toy_root, temperature, capsys):
    argv = ["--checkpoint", tiny_checkpoint, "--data_path", toy_root, "--num_workers", "0", "--device", "cpu",
            "--temperature", temperature]
    assert exit_code(evals.knn.cli, argv) == 2
    assert "--temperature: must be a finite number > 0" in capsys.readouterr().err


def test_knn_input_size_is_checked_against_the_encoder(tiny_checkpoint, toy_root, capsys):
    argv = ["--checkpoint", tiny_checkpoint, "--data_path", toy_root, "--num_workers", "0", "--device", "cpu"]
    assert evals.knn.cli(argv + ["--input_size", "32"])["knn_top1"] >= 0  # one side: a square
    for size in (["36"], ["4", "4"], ["40", "36"]):
        capsys.readouterr()
        assert exit_code(evals.knn.cli, argv + ["--input_size", *size]) == 1
        err = capsys.readouterr().err
        assert "does not fit the encoder of" in err and "multiple of its patch size 8" in err
        assert "Traceback" not in err


def test_check_dataset_refuses_a_nan_tolerance(toy_root, capsys):
    for flag, value in (("--tolerance", "nan"), ("--tolerance", "-1"), ("--coverage_ratio", "nan")):
        assert exit_code(check_dataset.main, ["--data_path", toy_root, "--workers", "1", flag, value]) == 2
        assert f"argument {flag}" in capsys.readouterr().err


def test_visualize_refuses_a_negative_count_and_reports_a_full_disk(toy_root, tmp_path, fs_64k, capsys):
    argv = ["--data_path", toy_root, "--mask_method", "segments", "--out", str(tmp_path / "vis")]
    assert exit_code(visualize.main, argv + ["--num", "-5"]) == 2
    assert "--num: must be a positive integer" in capsys.readouterr().err and not (tmp_path / "vis").exists()
    (fs_64k / "filler").write_bytes(b"\0" * (64 * 1024 - 8192))
    argv[-1] = str(fs_64k / "vis")
    assert exit_code(lambda a: visualize.run_tool(visualize.main, a), argv + ["--num", "2"]) == 1
    err = capsys.readouterr().err
    assert "ERROR: could not write " in err and "No space left on device" in err and "Traceback" not in err
    assert not [f for f in os.listdir(fs_64k / "vis") if ".tmp" in f]


def test_export_on_a_full_disk_leaves_the_previous_export(tiny_checkpoint, fs_64m, capsys):
    out = fs_64m / "timm"
    first = export.export(tiny_checkpoint, "timm", str(out))
    before = {f: open(f, "rb").read() for f in first}
    (fs_64m / "filler").write_bytes(b"\0" * (shutil.disk_usage(fs_64m).free - 2 * 2 ** 20))
    assert exit_code(lambda a: export.run_tool(export.main, a),
                     ["--checkpoint", tiny_checkpoint, "--to", "timm", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"could not write the timm export into {out}: " in err and "nothing in" in err and "Traceback" not in err
    assert {f: open(f, "rb").read() for f in first} == before  # the previous export, whole
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    os.remove(fs_64m / "filler")
    for to in ("timm", "encoder"):  # with room, every kind of export goes through the staging folder
        files = export.export(tiny_checkpoint, to, str(fs_64m / to))
        assert files and all(os.path.isfile(f) for f in files)
        assert not [n for n in os.listdir(fs_64m / to) if n.startswith(".export")]
