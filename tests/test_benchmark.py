"""benchmark.py: chunks + evaluations end to end, resuming after a kill, --eval, compare, errors."""
import glob
import json
import os
import pathlib

import pytest
import torch

import benchmark
import evals.report
import evals.runs
import main_pretrain
from util.misc import UserError


def bench_args(toy_root, toy_ade20k, out, *extra, method="segments"):
    return ["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(out),
            "--mask-method", method, "--coverage-ratio", "30", "--model", "mae_vit_tiny_patch8",
            "--pretrain-epochs", "2", "--eval-freq", "1", "--seg-epochs", "1", "--crop-size", "32",
            "--seg-decoder", "linear", "--launcher", "inprocess",
            "--pretrain-args", "--input_size 32 --batch_size 16 --warmup_epochs 0 --num_workers 0 --device cpu",
            "--seg-args", "--batch-size 8 --lr 0.01 --num-workers 0 --device cpu", *extra]


def run_dir(out, epochs=None):
    """The one pretraining run folder under out (or its evaluation after `epochs`)."""
    [pre] = glob.glob(str(out / "pretrain_output" / "*-seed0-*"))
    if epochs is None:
        return pathlib.Path(pre)
    [ev] = glob.glob(str(out / "eval_output" / os.path.basename(pre) / f"{epochs}ep-seg*"))
    return pathlib.Path(ev)


@pytest.mark.slow
def test_two_chunks_end_to_end_continue_one_pretraining_run(toy_root, toy_ade20k, tmp_path, count_stages):
    out = tmp_path / "bench"
    rows = benchmark.cli(bench_args(toy_root, toy_ade20k, out))
    assert count_stages == ["main_pretrain", "segmenter.train"] * 2
    pre = run_dir(out)
    assert pre.name.startswith("segments-cov30-vit_tiny_patch8-seed0-")
    assert json.loads((pre / "config.json").read_text())["config"]["coverage_ratio"] == 30.0
    assert {"checkpoint-1.pth", "checkpoint-2.pth"} <= set(os.listdir(pre))
    for epochs in (1, 2):
        done = json.loads((run_dir(out, epochs) / "done.json").read_text())
        assert done["epochs"] == epochs and 0 <= done["mIoU"] <= 100
        assert (run_dir(out, epochs) / "metrics.json").exists()
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["coverage_ratio"], r["epochs"]) for r in lines] == [("segments", 30.0, 1),
                                                                                 ("segments", 30.0, 2)]
    assert all(r["pretrain_img_per_sec"] > 0 and r["eval_time_s"] > 0 for r in lines) and rows == lines
    assert (out / "miou_vs_epochs.png").stat().st_size > 1000
    # the two chunks are one run: the same weights as two epochs straight
    straight = tmp_path / "straight"
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--mask_method", "segments",
                       "--coverage_ratio", "30", "--epochs", "2", "--input_size", "32", "--batch_size", "16",
                       "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
                       "--output_dir", str(straight), "--log_dir", str(straight)])
    a = torch.load(pre / "checkpoint-2.pth", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint-1.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rerun_after_a_kill_does_only_the_rest(toy_root, toy_ade20k, tmp_path, monkeypatch, count_stages):
    out = tmp_path / "bench"
    real = benchmark.pretrain_until

    def killed_in_second_chunk(epochs, args, stack):
        if epochs == 2:
            raise KeyboardInterrupt  # as if the job was killed after the first evaluation
        return real(epochs, args, stack)

    monkeypatch.setattr(benchmark, "pretrain_until", killed_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        benchmark.cli(bench_args(toy_root, toy_ade20k, out))
    first_done = run_dir(out, 1) / "done.json"
    stamp = first_done.stat().st_mtime_ns
    monkeypatch.setattr(benchmark, "pretrain_until", real)
    count_stages.clear()
    benchmark.cli(bench_args(toy_root, toy_ade20k, out))
    assert count_stages == ["main_pretrain", "segmenter.train"]  # only the second chunk and its evaluation
    assert first_done.stat().st_mtime_ns == stamp  # never redone, never overwritten
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    # a third run has nothing left to do
    count_stages.clear()
    benchmark.cli(bench_args(toy_root, toy_ade20k, out))
    assert count_stages == []


@pytest.mark.slow
def test_eval_of_an_existing_checkpoint_and_errors(toy_root, toy_ade20k, tmp_path, capsys):
    out = tmp_path / "bench"
    args = bench_args(toy_root, toy_ade20k, out, "--pretrain-epochs", "1")
    benchmark.cli(args)
    (out / "results.jsonl").unlink()
    import shutil
    shutil.rmtree(run_dir(out, 1))
    # --eval N through a subprocess stage: evaluates that checkpoint only
    sub = [a if a != "inprocess" else "subprocess" for a in args]
    benchmark.cli(sub + ["--eval", "1"])
    assert (run_dir(out, 1) / "done.json").exists()
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        benchmark.cli(args + ["--eval", "5"])
    assert exc.value.code == 1 and "no pretraining checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.cli(bench_args(toy_root, str(tmp_path / "no_ade"), out))
    assert "--ade20k-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.cli(bench_args(str(tmp_path), toy_ade20k, tmp_path / "b2"))
    assert "has no train/ folder" in capsys.readouterr().err


def test_compare_overlays_runs_and_table(tmp_path, capsys):
    for method, mious in (("patches", [10.0, 20.0]), ("four_channels", [12.0, 25.0])):
        d = tmp_path / method
        d.mkdir()
        for epochs, miou in zip((100, 200), mious):
            evals.runs.append_result(str(d / "results.jsonl"), {"method": method, "coverage_ratio": 50.0,
                                                               "epochs": epochs, "mIoU": miou,
                                                               "pixel_accuracy": 50.0})
        # a repeated row is not duplicated
        evals.runs.append_result(str(d / "results.jsonl"), {"method": method, "coverage_ratio": 50.0,
                                                           "epochs": 100, "mIoU": 0.0, "pixel_accuracy": 0.0})
    benchmark.cli(["compare", "--output-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert "patches" in text and "four_channels" in text and text.count("\n") >= 6
    assert (tmp_path / "miou_vs_epochs.png").stat().st_size > 1000
    assert len(evals.report.read_results(str(tmp_path))) == 4


def test_eval_points_and_backbone_default():
    parser = benchmark.get_args_parser()
    args = parser.parse_args(["--in1k-dir", "a", "--ade20k-dir", "b", "--pretrain-epochs", "250",
                              "--eval-freq", "100", "--model", "mae_vit_large_patch16"])
    benchmark.check_args(args, parser)
    assert benchmark.eval_points(args) == [100, 200, 250]
    assert args.seg_backbone == "vit_large_patch16"
    with pytest.raises(UserError, match="no official MAE"):
        args.stack, args.model = "official", "mae_vit_tiny_patch16"
        evals.runs.resolve_stack(args)


@pytest.mark.slow
def test_another_configuration_is_another_run_with_its_own_curve(toy_root, toy_ade20k, tmp_path, capsys):
    out = tmp_path / "bench"
    one = ["--pretrain-epochs", "1"]
    benchmark.cli(bench_args(toy_root, toy_ade20k, out, *one))
    cov60 = [a if a != "30" else "60" for a in bench_args(toy_root, toy_ade20k, out, *one)]
    benchmark.cli(cov60)  # nothing of the 30 % run is reused
    runs = sorted(os.path.basename(p) for p in glob.glob(str(out / "pretrain_output" / "*")))
    assert [r.split("-seed0-")[0] for r in runs] == ["segments-cov30-vit_tiny_patch8", "segments-cov60-vit_tiny_patch8"]
    rows = evals.report.read_results(str(out))
    assert sorted(r["coverage_ratio"] for r in rows) == [30.0, 60.0]
    assert all(r["config"]["pretrain_args"] and r["run_id"] in runs for r in rows)
    capsys.readouterr()
    benchmark.cli(["compare", "--output-dir", str(out)])
    table = capsys.readouterr().out
    assert "segments 30%" in table and "segments 60%" in table
    assert set(evals.report.curve_labels(rows).values()) == {"segments 30%", "segments 60%"}
    # the same flags again: resumed, nothing trained
    capsys.readouterr()
    benchmark.cli(cov60)
    assert "already done" in capsys.readouterr().out


def test_curve_labels_tell_apart_what_differs():
    def row(run_id, **config):
        return {"run_id": run_id, "eval_id": "e", "method": "patches", "coverage_ratio": None, "epochs": 1,
                "mIoU": 1.0, "pixel_accuracy": 1.0, "model": "mae_vit_base_patch16", "stack": config.pop("stack", ""),
                "config": {"seed": 0, "pretrain_epochs": 800, **config}}
    rows = [row("a"), row("b", stack="official"), row("c", seed=1), row("d", pretrain_epochs=400)]
    labels = evals.report.curve_labels(rows)
    assert len(set(labels.values())) == 4
    assert labels[("b", "e")] == "patches, stacked" and labels[("c", "e")] == "patches, seed 1"
    legacy = {"method": "four_channels", "coverage_ratio": 40.0, "epochs": 1, "mIoU": 1.0, "pixel_accuracy": 1.0}
    assert evals.report.curve_labels([legacy]) == {("four_channels|40.0", None): "four_channels 40%"}


def test_a_run_in_the_earlier_layout_is_not_continued_silently(toy_root, toy_ade20k, tmp_path, capsys):
    out = tmp_path / "bench"
    old = out / "pretrain_output" / "segments"
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--mask_method", "segments",
                       "--coverage_ratio", "30", "--epochs", "2", "--stop_epoch", "1", "--input_size", "32",
                       "--batch_size", "16", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
                       "--output_dir", str(old), "--log_dir", str(old)])
    with pytest.raises(SystemExit) as exc:
        benchmark.cli(bench_args(toy_root, toy_ade20k, out))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and f"mv {old} {out / 'pretrain_output'}/segments-cov30-" in err


def test_eval_spellings_of_the_baselines():
    assert benchmark.eval_type("-2") == "random" and benchmark.eval_type("-3") == "official"
    assert benchmark.eval_type("random") == "random" and benchmark.eval_type("-1") == -1
    assert benchmark.eval_type("12") == 12
    for bad in ("-4", "-100", "rand"):
        with pytest.raises(Exception, match="means nothing|must be"):
            benchmark.eval_type(bad)


@pytest.mark.slow
def test_random_and_official_baselines_have_rows_and_reference_lines(toy_root, toy_ade20k, tmp_path, pretrained,
                                                                      monkeypatch, count_stages, capsys):
    # an "official" encoder for the tiny model, served from a local file (no network in tests)
    encoder = {k: v for k, v in torch.load(pretrained["patches"], weights_only=True)["model"].items()
               if not k.startswith(("decoder_", "mask_token"))}
    official = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, official)
    monkeypatch.setitem(evals.runs.OFFICIAL_MAE, "mae_vit_tiny_patch8", official.as_uri())
    out = tmp_path / "bench"
    benchmark.cli(bench_args(toy_root, toy_ade20k, out, "--eval", "-2"))  # the original's spelling of random
    assert "WARNING: no --mae-chp: the encoder starts from random weights" in capsys.readouterr().out
    rows = benchmark.cli(bench_args(toy_root, toy_ade20k, out, "--eval", "official"))
    assert count_stages == ["segmenter.train"] * 2  # no pretraining stage
    by_kind = {r["baseline"]: r for r in rows}
    assert set(by_kind) == {"random", "official"} and by_kind["official"]["checkpoint_sha256"]
    assert (out / "official" / "mae_pretrain_vit_tiny.pth.sha256").exists()
    assert all(0 <= r["mIoU"] <= 100 and r["method"] in ("random init", "official MAE") for r in rows)
    # done once: a rerun runs no stage and adds no row
    benchmark.cli(bench_args(toy_root, toy_ade20k, out, "--eval", "random"))
    assert count_stages == ["segmenter.train"] * 2
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    # beside a real run: compare draws the baselines as horizontal reference lines
    benchmark.cli(bench_args(toy_root, toy_ade20k, out, "--pretrain-epochs", "1"))
    drawn = {}
    real_axhline = __import__("matplotlib.axes", fromlist=["Axes"]).Axes.axhline

    def recording_axhline(self, y=0, *a, **k):
        drawn[k.get("label")] = y
        return real_axhline(self, y, *a, **k)

    monkeypatch.setattr("matplotlib.axes.Axes.axhline", recording_axhline)
    capsys.readouterr()
    benchmark.compare_cli(["--output-dir", str(out)])
    table = capsys.readouterr().out
    assert "random init (baseline)" in table and "official MAE (baseline)" in table
    assert drawn == {"random init (baseline)": by_kind["random"]["mIoU"],
                     "official MAE (baseline)": by_kind["official"]["mIoU"]}
