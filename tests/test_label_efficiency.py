"""Label-efficiency sweeps: main_finetune.py --train_subset K (per class, or a fraction), seeded and
class-balanced, its list beside the checkpoint, part of the run's identity, one table row per size."""
import collections
import json

import numpy as np
import pytest
import torch
from test_finetune import downstream

import benchmark
import main_finetune
import main_linprobe
from inputs.classification import class_balanced_subset


def test_class_balanced_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [10, 10, 10, 2])
    a = class_balanced_subset(labels, 3, seed=0)
    assert collections.Counter(labels[a].tolist()) == {0: 3, 1: 3, 2: 3, 3: 2}  # a small class gives all it has
    assert np.array_equal(a, class_balanced_subset(labels, 3, seed=0)) and list(a) == sorted(a)
    assert not np.array_equal(a, class_balanced_subset(labels, 3, seed=1))
    half = class_balanced_subset(labels, 0.5, seed=0)
    assert collections.Counter(labels[half].tolist()) == {0: 5, 1: 5, 2: 5, 3: 1}
    assert set(class_balanced_subset(labels, 0.05, seed=0).tolist()) & set(np.flatnonzero(labels == 3).tolist())


def test_train_subset_flag_values(toy_root, tmp_path, capsys):
    for bad in ("0", "1.5", "-2"):
        with pytest.raises(SystemExit) as exc:
            main_finetune.cli(downstream(toy_root, tmp_path / "x", "--train_subset", bad))
        assert exc.value.code == 2 and "images per class (>= 1) or a fraction in (0, 1)" in capsys.readouterr().err


def test_subset_runs_write_their_list_and_keep_their_identity(toy_root, pretrained, tmp_path, capsys):
    out = tmp_path / "k2"
    main_finetune.cli(downstream(toy_root, out, "--finetune", pretrained["patches"], "--train_subset", "2"))
    listed = [line.split("\t") for line in (out / "train_subset.txt").read_text().splitlines()]
    assert len(listed) == 8 and collections.Counter(label for _, label in listed) == {"0": 2, "1": 2, "2": 2, "3": 2}
    assert all(rel.count("/") == 1 and not rel.startswith("/") for rel, _ in listed)  # <class>/<image>, as in train/
    ckpt = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert ckpt["args"].train_subset == 2 and ckpt["args"].run_start["train_subset"] == 2
    # the same command again draws the same list
    again = tmp_path / "k2b"
    main_finetune.cli(downstream(toy_root, again, "--finetune", pretrained["patches"], "--train_subset", "2"))
    assert (again / "train_subset.txt").read_text() == (out / "train_subset.txt").read_text()
    # another subset size is another run: not continued from this folder's checkpoint
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main_finetune.cli(downstream(toy_root, out, "--finetune", pretrained["patches"], "--train_subset", "4",
                                     "--epochs", "2"))
    assert exc.value.code == 1 and "train_subset" in capsys.readouterr().err
    # a sweep: one row per size in `benchmark.py compare`
    main_finetune.cli(downstream(toy_root, tmp_path / "half", "--finetune", pretrained["patches"],
                                 "--train_subset", "0.5"))
    main_linprobe.cli(downstream(toy_root, tmp_path / "lin_all", "--finetune", pretrained["patches"]))
    capsys.readouterr()
    benchmark.cli(["compare", "--output-dir", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.split()[:1] in (["k2"], ["k2b"], ["half"],
                                                                                        ["lin_all"])}
    assert rows["k2"][3:6] == ["2", "8", "1"] and rows["half"][3:6] == ["0.5", "16", "1"]
    assert rows["lin_all"][1] == "linprobe" and rows["lin_all"][3:5] == ["all", "32"]
    result = json.loads((tmp_path / "half" / "finetune_result.json").read_text())
    logged = json.loads((tmp_path / "half" / "log.txt").read_text().splitlines()[-1])
    assert result["max_accuracy"] == logged["max_accuracy"] and result["train_images"] == 16
