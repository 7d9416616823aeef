"""Tar shards (inputs/shards.py, tools/write_shards.py): the samples are the tree's, every sample is
read once per epoch across ranks and workers, SA-1B's own tars train as they are, resume at an
epoch boundary is exact, and the errors a user can cause name the problem."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from test_distributed import assert_ranks_in_sync
from test_pretrain_cli import common

import main_pretrain
from conftest import REPO
from inputs import shards as shards_module  # count_samples lives there
from inputs.pretrain import SegmentMaskImageFolder
from inputs.shards import ShardDataset, build_shard_dataset, expand_shards, shard_counts, worker_ranges
from sam.files import MaskFileError
from tools.write_shards import write_shards
from util.misc import UserError


@pytest.fixture(scope="module")
def toy_shards(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(toy_root, str(out), samples_per_shard=7)  # 32 samples: 4 shards of 7 and one of 4
    return str(out)


def identity(img, mask=None, generator=None):
    return (img, mask) if mask is not None else img


def all_samples(dataset: ShardDataset) -> list[dict]:
    plan = [(s, 0, int(c), 0) for s, c in zip(dataset.shards, dataset.counts)]
    return [sample for _, sample in dataset._samples(plan)]


def test_shards_hold_the_tree_samples_exactly(toy_root, toy_shards):
    index = json.load(open(os.path.join(toy_shards, "shards.json")))
    assert [s["samples"] for s in index["shards"]] == [7, 7, 7, 7, 4] and index["masks"] == "json"
    folder = SegmentMaskImageFolder(toy_root, with_masks=True, coverage_ratio=30)
    by_rel = {folder.samples.rel(i): i for i in range(len(folder))}
    dataset = build_shard_dataset([toy_shards], identity, True, 30, batch_size=4, world_size=1, rank=0, seed=0,
                                  shuffle_buffer=0, skip_bad_samples=False, decode=True)
    samples = all_samples(dataset)
    rels = [s["path"].decode() for s in samples]
    assert sorted(rels) == sorted(by_rel)  # every image once
    assert rels != sorted(rels)  # in the writer's seeded order, mixing the classes
    for sample, rel in zip(samples, rels):
        img, mask, label = dataset.read(sample, "x")
        ref_img, ref_mask, ref_label = folder[by_rel[rel]]
        assert np.array_equal(np.asarray(img), np.asarray(ref_img)) and np.array_equal(mask, ref_mask)
        assert label == ref_label
    assert index["classes"] == sorted(os.listdir(os.path.join(toy_root, "train")))


def test_every_sample_once_per_epoch_across_ranks_and_workers(toy_shards):
    counts = [7, 7, 7, 7, 4]
    seen = {}
    for epoch in (0, 1):
        positions = []
        for rank in range(2):
            d = ShardDataset(expand_shards(toy_shards), counts, identity, False, 50, batch_size=3, world_size=2,
                             rank=rank, seed=5)
            assert len(d) == 15  # 32 // 2 = 16 per rank, 5 whole batches of 3
            per_worker = [sum(t for _, _, t, _ in d.plan(epoch, w, 3)) for w in range(3)]
            assert per_worker == [6, 6, 3]  # whole batches: 2, 2, 1
            for w in range(3):
                for shard, skip, take, first in d.plan(epoch, w, 3):
                    positions += list(range(first, first + take))
                    assert 0 <= skip and skip + take <= counts[int(shard[-10:-4])]
        assert sorted(positions) == list(range(30))  # each read once; 2 left over at the end of the order
        seen[epoch] = [tuple(d.plan(epoch, w, 3)) for w in range(3)]
    assert seen[0] != seen[1]  # another shard order each epoch
    d = ShardDataset(expand_shards(toy_shards), counts, identity, False, 50, batch_size=3, world_size=2, rank=1,
                     seed=5)
    assert [tuple(d.plan(1, w, 3)) for w in range(3)] == seen[1]  # and the same one again (resume)
    assert worker_ranges([7, 7, 4], 5, 16) == [(0, 5, 2), (1, 0, 7), (2, 0, 2)]


def test_loader_workers_yield_each_sample_once(toy_shards):
    dataset = build_shard_dataset([toy_shards], lambda img, mask=None, generator=None: torch.zeros(1), False, 50,
                                  batch_size=4, world_size=1, rank=0, seed=0, shuffle_buffer=5,
                                  skip_bad_samples=False, decode=True)
    keys = []
    original = dataset.prepare
    dataset.prepare = lambda sample, position, epoch: (keys.append(sample["__key__"]), original(sample, position,
                                                                                                 epoch))[1]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True, num_workers=0)
    assert len(loader) == 8 and len(list(loader)) == 8
    assert len(keys) == 32 and len(set(keys)) == 32


def write_sa1b_tar(path, start: int, n: int, size=(40, 56)):
    """A tar as SA-1B ships them: sa_<id>.jpg + sa_<id>.json, no class, no index."""
    h, w = size
    rng = np.random.default_rng(start)
    with tarfile.open(path, "w") as tar:
        for image_id in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
            anns = []
            for k in range(3):
                m = np.zeros((h, w), np.uint8)
                m[: (k + 1) * h // 4, : (k + 1) * w // 4] = 1
                rle = mask_utils.encode(np.asfortranarray(m))
                anns.append({"id": k, "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                             "area": int(m.sum()), "bbox": [0, 0, (k + 1) * w / 4, (k + 1) * h / 4],
                             "predicted_iou": 0.9, "point_coords": [[1.0, 1.0]], "stability_score": 0.95,
                             "crop_box": [0, 0, w, h]})
            meta = json.dumps({"image": {"image_id": image_id, "width": w, "height": h,
                                         "file_name": f"sa_{image_id}.jpg"}, "annotations": anns}).encode()
            for name, data in ((f"sa_{image_id}.jpg", buf.getvalue()), (f"sa_{image_id}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_sa1b_tars_train_as_they_are(tmp_path, monkeypatch):
    folder = tmp_path / "sa1b"
    folder.mkdir()
    write_sa1b_tar(folder / "sa_000000.tar", 1, 10)
    write_sa1b_tar(folder / "sa_000001.tar", 11, 9)
    counted = []
    real_count = shards_module.count_samples
    monkeypatch.setattr(shards_module, "count_samples", lambda p: counted.append(p) or real_count(p))
    out = tmp_path / "out"
    main_pretrain.cli(common(str(folder), out, "--mask_method", "four_channels", "--coverage_ratio", "25",
                             "--batch_size", "4", "--vis_freq", "1"))
    assert len(counted) == 2  # the headers were read once
    assert json.load(open(folder / ".segmae_shard_counts.json"))["sa_000001.tar"][2] == 9
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"].data_format == "auto" and ckpt["args"].in_chans == 4
    assert json.loads((out / "log.txt").read_text().splitlines()[0])["train_loss"] > 0
    counted.clear()
    assert shard_counts(expand_shards(str(folder)))[0] == [10, 9] and counted == []  # read back, not counted
    # the chosen segment is SA-1B's annotation closest to 25 % (the second: 2/4 x 2/4 of the image)
    d = build_shard_dataset([str(folder / "sa_000000.tar")], identity, True, 25, 4, 1, 0, 0, 0, False, True)
    _, mask, label = d.read(all_samples(d)[0], "x")
    assert label == 0 and mask.shape == (40, 56) and mask.sum() == 20 * 28


def test_resume_at_an_epoch_boundary_is_exact(toy_shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--mask_method", "segments", "--epochs", "2", "--save_freq", "1", "--num_workers", "2",
             "--shuffle_buffer", "6"]
    main_pretrain.cli(common(toy_shards, straight, *flags))
    main_pretrain.cli(common(toy_shards, resumed, *flags, "--resume", str(straight / "checkpoint-0.pth")))
    a = torch.load(straight / "checkpoint-1.pth", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoint-1.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_errors_name_the_problem(toy_root, toy_shards, tmp_path, capsys):
    with pytest.raises(UserError, match=r"1 of 3 shard\(s\) do not exist, e\.g\. .*shard-000009\.tar"):
        expand_shards(os.path.join(toy_shards, "shard-{000000,000001,000009}.tar"))
    with pytest.raises(SystemExit):
        main_pretrain.cli(common(toy_root, tmp_path / "mixed", "--mask_method", "patches") + ["--data_path", toy_root,
                                                                                            toy_shards])
    assert "--data_path mixes tar shards and folders" in capsys.readouterr().err
    no_masks = tmp_path / "no_masks"
    write_shards(toy_root, str(no_masks), samples_per_shard=16, masks=False)
    d = build_shard_dataset([str(no_masks)], identity, True, 50, 4, 1, 0, 0, 0, False, True)
    with pytest.raises(MaskFileError, match=r"has no masks \(\.json member\).*tools/write_shards\.py"):
        d.read(all_samples(d)[0], "x")
    # a shard rewritten with fewer samples than its index says
    broken = tmp_path / "broken"
    shutil.copytree(toy_shards, broken)
    with tarfile.open(broken / "shard-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(broken / "shard-000000.tar", "w") as tar:
        for m, data in members[:-8]:  # two samples' members left out
            tar.addfile(m, io.BytesIO(data))
    d = build_shard_dataset([str(broken)], identity, False, 50, 4, 1, 0, 0, 0, False, True)
    with pytest.raises(UserError, match=r"shard-000000\.tar holds 5 samples, but its count says 7"):
        list(d._samples([(str(broken / "shard-000000.tar"), 0, 7, 0)]))
    with pytest.raises(UserError, match=r"only 32 samples in 5 shard\(s\) for a global batch of 64"):
        build_shard_dataset([toy_shards], identity, False, 50, 64, 1, 0, 0, 0, False, True)


def test_write_shards_keeps_the_segmae_choice(tmp_path):
    from tools.make_toy_data import make_toy_dataset
    root = make_toy_dataset(str(tmp_path / "segmae"), train_per_class=3, val_per_class=1, height=32, width=32,
                            seed=2, mask_format="segmae")
    out = tmp_path / "shards"
    write_shards(root, str(out), samples_per_shard=5)
    folder = SegmentMaskImageFolder(root, with_masks=True, coverage_ratio=40)
    by_rel = {folder.samples.rel(i): i for i in range(len(folder))}
    d = build_shard_dataset([str(out)], identity, True, 40, 2, 1, 0, 0, 0, False, True)
    samples = all_samples(d)
    assert len(samples) == len(by_rel)
    for sample in samples:
        _, mask, _ = d.read(sample, "x")
        assert np.array_equal(mask, folder[by_rel[sample["path"].decode()]][1])


@pytest.mark.slow
def test_two_ranks_read_disjoint_samples_and_stay_in_sync(toy_shards, tmp_path):
    out = tmp_path / "ddp"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "main_pretrain.py", *common(toy_shards, out, "--mask_method", "segments", "--batch_size",
                                                      "4")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_ranks_in_sync(res.stdout)
    assert re.search(r"ShardDataset\(32 samples in 5 shard\(s\), 16 per rank per epoch", res.stdout)
