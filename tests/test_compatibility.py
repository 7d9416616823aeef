"""Runs written by an earlier version of this repo (tests/fixtures/runs_d94c266/: a benchmark
folder of the code before the mask methods became objects and the modules were split) still load,
continue and compare. Checkpoints are rebuilt from their recorded layout (every key, tensor name and
shape, args, optimizer groups); the logs, configs and results rows are the original files."""
import argparse
import json
import pathlib
import shutil

import pytest
import torch

import benchmark
import main_finetune
import main_pretrain
import models_mae
from evals.report import read_results

OLD = pathlib.Path(__file__).parent / "fixtures" / "runs_d94c266"
RUNS = {"patches": "patches-vit_tiny_patch8-seed0-1f7fae",
        "four_channels": "four_channels-cov40-vit_tiny_patch8-seed0-356d36"}
EVAL = "2ep-seg2d7669"


def manifest(method: str) -> dict:
    return json.loads((OLD / f"checkpoint_{method}.json").read_text())


def substitute(obj, places: dict):
    """The old run's absolute paths (/tmp/oldrun/...) replaced by this test's folders."""
    if isinstance(obj, str):
        for old, new in places.items():
            obj = obj.replace(old, new)
        return obj
    if isinstance(obj, list):
        return [substitute(x, places) for x in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, places) for k, v in obj.items()}
    return obj


def current_model(method: str):
    m = manifest(method)["args"]
    return models_mae.build_mae(m["model"], img_size=tuple(m["input_size"]), norm_pix_loss=m["norm_pix_loss"],
                                mask_method=m["mask_method"])


def rebuild_checkpoint(method: str, places: dict) -> dict:
    """A checkpoint of the recorded layout: this model's weights under the old names, AdamW state
    (step, exp_avg, exp_avg_sq) for every parameter the old optimizer held."""
    m = substitute(manifest(method), places)
    torch.manual_seed(0)
    weights = current_model(method).state_dict()
    model = {name: weights[name].clone() for name in m["model"]}
    state = {}
    for group in m["optimizer"]["param_groups"]:
        for index, name in zip(group["params"], group["param_names"]):
            state[index] = {"step": torch.tensor(m["optimizer"]["step"]),
                            "exp_avg": torch.zeros_like(model[name]), "exp_avg_sq": torch.zeros_like(model[name])}
    ckpt = {"model": model, "optimizer": {"state": state, "param_groups": m["optimizer"]["param_groups"]},
            "epoch": m["epoch"], "scaler": m["scaler"], "args": argparse.Namespace(**m["args"])}
    assert list(ckpt) == m["keys"]
    return ckpt


@pytest.fixture
def old_bench(tmp_path, toy_root, toy_ade20k):
    """The old benchmark folder, as it was left, under tmp_path/bench."""
    out = tmp_path / "bench"
    places = {"/tmp/oldrun/toy": toy_root, "/tmp/oldrun/ade": toy_ade20k, "/tmp/oldrun/bench": str(out)}
    for method, rid in RUNS.items():
        run = out / "pretrain_output" / rid
        run.mkdir(parents=True)
        torch.save(rebuild_checkpoint(method, places), run / "checkpoint-2.pth")
        shutil.copy(OLD / f"log_{method}.txt", run / "log.txt")
        (run / "config.json").write_text(json.dumps(substitute(json.loads((OLD / f"config_{method}.json")
                                                                          .read_text()), places), indent=1))
    ev = out / "eval_output" / RUNS["patches"] / EVAL
    ev.mkdir(parents=True)
    shutil.copy(OLD / "done_patches.json", ev / "done.json")
    shutil.copy(OLD / "metrics_patches.json", ev / "metrics.json")
    shutil.copy(OLD / "results.jsonl", out / "results.jsonl")
    return out


def old_command(toy_root, toy_ade20k, out, method, *extra):
    """The command that made the old run (recorded in its results row), with this test's paths."""
    return ["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(out), "--mask-method", method,
            "--coverage-ratio", "40", "--model", "mae_vit_tiny_patch8", "--pretrain-epochs", "2", "--eval-freq", "2",
            "--seg-epochs", "2", "--crop-size", "32", "--seg-decoder", "linear", "--launcher", "inprocess",
            "--pretrain-args", "--input_size 64 --batch_size 16 --warmup_epochs 1 --blr 1e-3 --num_workers 0 "
                               "--print_freq 6",
            "--seg-args", "--batch-size 8 --lr 0.01 --num-workers 0 --print-freq 5", *extra]


@pytest.mark.parametrize("method", list(RUNS))
def test_old_checkpoint_layout_is_todays_model(method):
    m = manifest(method)
    assert {k: list(v.shape) for k, v in current_model(method).state_dict().items()} == m["model"]
    names = [n for g in m["optimizer"]["param_groups"] for n in g["param_names"]]
    trainable = [n for n, p in current_model(method).named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)


def test_compare_reads_the_old_rows(old_bench, capsys):
    rows = read_results(str(old_bench))
    assert sorted((r["run_id"], r["epochs"], round(r["mIoU"], 2)) for r in rows) == [
        (RUNS["four_channels"], 2, 13.97), (RUNS["patches"], 2, 21.71)]
    benchmark.cli(["compare", "--output-dir", str(old_bench)])
    table = capsys.readouterr().out
    assert "patches                 2   21.71" in table and "four_channels 40%       2   13.97" in table
    assert (old_bench / "miou_vs_epochs.png").stat().st_size > 1000


def test_the_old_command_reuses_its_pretraining_and_reevaluates_under_todays_recipe(
        old_bench, toy_root, toy_ade20k, count_stages, capsys):
    """Same run id, so the old checkpoint is the run's; the Segmenter recipe has changed since
    (Nesterov SGD, logit merging: segmenter.RECIPE), so its evaluation is redone as another curve."""
    before = (old_bench / "results.jsonl").read_text().splitlines()
    rows = benchmark.cli(old_command(toy_root, toy_ade20k, old_bench, "patches"))
    assert count_stages == ["segmenter.train"]  # no pretraining: the old checkpoint-2.pth is used
    out = capsys.readouterr().out
    assert f"mae-chp {old_bench}/pretrain_output/{RUNS['patches']}/checkpoint-2.pth" in out
    after = (old_bench / "results.jsonl").read_text().splitlines()
    assert after[:2] == before and len(after) == 3 and len(rows) == 3
    new = json.loads(after[2])
    assert new["run_id"] == RUNS["patches"] and new["eval_id"] != "2d7669"
    # two curves, labelled by what differs: the recipe the old row did not record
    assert "patches, seg_recipe=-  " in out and "patches, seg_recipe=rstrudel-1  " in out
    count_stages.clear()
    benchmark.cli(old_command(toy_root, toy_ade20k, old_bench, "patches"))
    assert count_stages == []  # and now it is done


def test_a_new_evaluation_of_the_old_checkpoint(old_bench, toy_root, toy_ade20k, count_stages):
    before = (old_bench / "results.jsonl").read_text().splitlines()
    cmd = old_command(toy_root, toy_ade20k, old_bench, "patches")
    cmd[cmd.index("--seg-epochs") + 1] = "1"
    rows = benchmark.cli(cmd)
    assert count_stages == ["segmenter.train"]  # no pretraining: the old checkpoint-2.pth is used
    after = (old_bench / "results.jsonl").read_text().splitlines()
    assert after[:2] == before and len(after) == 3 and len(rows) == 3
    new = json.loads(after[2])
    assert new["run_id"] == RUNS["patches"] and new["epochs"] == 2 and 0 <= new["mIoU"] <= 100


def test_old_four_channels_checkpoint_resumes_and_finetunes(old_bench, toy_root, tmp_path):
    run = old_bench / "pretrain_output" / RUNS["four_channels"]
    old = torch.load(run / "checkpoint-2.pth", weights_only=False)
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--mask_method", "four_channels",
                       "--coverage_ratio", "40", "--input_size", "64", "--batch_size", "16", "--epochs", "3",
                       "--warmup_epochs", "1", "--blr", "1e-3", "--num_workers", "0", "--device", "cpu",
                       "--output_dir", str(run), "--log_dir", str(run), "--checkpoint_name", "epochs_done",
                       "--resume", str(run / "checkpoint-2.pth")])
    new = torch.load(run / "checkpoint-3.pth", weights_only=False)
    assert new["epoch"] == 2  # the third epoch, after the old two
    moved = [k for k in old["model"] if not torch.equal(old["model"][k], new["model"][k])]
    assert "blocks.0.attn.qkv.weight" in moved and "patch_embed.proj.weight" in moved
    ft = tmp_path / "ft"
    main_finetune.cli(["--data_path", toy_root, "--model", "vit_tiny_patch8", "--finetune",
                       str(run / "checkpoint-3.pth"), "--input_size", "64", "--batch_size", "8", "--epochs", "1",
                       "--warmup_epochs", "0", "--nb_classes", "4", "--num_workers", "0", "--device", "cpu",
                       "--output_dir", str(ft), "--log_dir", str(ft)])
    stats = [json.loads(x) for x in (ft / "log.txt").read_text().splitlines()]
    assert stats[-1]["epoch"] == 0 and stats[-1]["test_acc1"] >= 0


def test_the_reference_lr_schedule_imports_from_its_old_path():
    """Scripts written against the MAE reference call util.lr_sched.adjust_learning_rate: it still
    imports, and gives the reference's schedule (linear warmup, then half-cycle cosine to min_lr,
    scaled per group by lr_scale)."""
    from util import lr_sched
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param]}, {"params": [param.detach().clone().requires_grad_()],
                                                         "lr_scale": 0.5}], lr=0.0)
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.55, 10: 0.1, 12: 0.1}
    for epoch, lr in expected.items():
        assert lr_sched.adjust_learning_rate(optimizer, epoch, args) == pytest.approx(lr)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, lr / 2])
