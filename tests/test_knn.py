"""evals/knn.py: weighted kNN top-1 (DINO protocol), the seeded class-balanced bank, the CLI, the
same score on one or two ranks, and the benchmark's kNN stage."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from evals import knn


@pytest.fixture(scope="module")
def colour_classes(tmp_path_factory):
    """Three classes told apart by colour only (noise on top), train/ and val/."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for c, rgb in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


def pixels_and_labels(root, split):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(f"{root}/{split}", transform=T.ToTensor())
    return torch.stack([x.flatten() for x, _ in ds]), torch.tensor(ds.targets)


def test_raw_pixels_score_high_and_shuffled_labels_near_chance(colour_classes):
    bank, bank_labels = pixels_and_labels(colour_classes, "train")
    queries, query_labels = pixels_and_labels(colour_classes, "val")
    assert knn.knn_top1(bank, bank_labels, queries, query_labels, num_classes=3, k=5) == 100.0
    shuffled = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        shuffled.append(knn.knn_top1(bank, bank_labels[torch.randperm(len(bank_labels), generator=g)], queries,
                                     query_labels, num_classes=3, k=5))
    assert 20 <= np.mean(shuffled) <= 47  # chance is 33%


def test_bank_is_balanced_and_seeded():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    a = knn.balanced_subset(targets, 4, seed=1)
    assert [sum(targets[i] == c for i in a) for c in range(3)] == [4, 3, 4]
    assert a == knn.balanced_subset(targets, 4, seed=1) and a != knn.balanced_subset(targets, 4, seed=2)


def test_cli_scores_a_checkpoint_of_each_kind(pretrained, toy_root, tmp_path):
    for method in ("patches", "four_channels"):
        out = tmp_path / f"{method}.json"
        result = knn.cli(["--checkpoint", pretrained[method], "--data_path", toy_root, "--bank_per_class", "4",
                          "--num_workers", "0", "--device", "cpu", "--out", str(out), "--batch_size", "8"])
        assert json.loads(out.read_text())["knn_top1"] == result["knn_top1"] and 0 <= result["knn_top1"] <= 100
        assert result["bank_size"] == 16 and result["queries"] == 8 and result["method"] == method


@pytest.mark.slow
def test_the_score_does_not_depend_on_the_number_of_ranks(pretrained, toy_root, tmp_path):
    base = ["-m", "evals.knn", "--checkpoint", pretrained["segments"], "--data_path", toy_root, "--bank_per_class",
            "5", "--num_workers", "0", "--device", "cpu", "--batch_size", "3", "--pool", "mean"]
    one = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *base, "--out", str(tmp_path / "two.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["knn_top1"] == b["knn_top1"] and a["bank_size"] == b["bank_size"] == 20


@pytest.mark.slow
def test_benchmark_knn_stage_fills_the_table_and_a_second_panel(toy_root, toy_ade20k, tmp_path, capsys):
    from test_benchmark import bench_args

    import benchmark
    out = tmp_path / "bench"
    rows = benchmark.cli(bench_args(toy_root, toy_ade20k, out, "--knn-eval", "--knn-bank-per-class", "4",
                                    "--knn-args", "--num_workers 0 --device cpu --batch_size 8"))
    assert [r["epochs"] for r in rows] == [1, 2] and all(0 <= r["knn_top1"] <= 100 and r["knn_time_s"] >= 0
                                                         for r in rows)
    text = capsys.readouterr().out
    table = text[text.index(" kNN "):]
    assert f"{rows[0]['knn_top1']:.2f}" in table
    import matplotlib.image
    png = matplotlib.image.imread(out / "miou_vs_epochs.png")
    assert png.shape[1] > 1.8 * png.shape[0]  # two panels side by side
