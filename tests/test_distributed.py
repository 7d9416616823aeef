"""Two-process DDP (gloo, CPU) through torchrun matches one process with the same global batch."""
import json
import re
import subprocess
import sys

import pytest
import torch
from test_pretrain_cli import common

from conftest import REPO


def assert_ranks_in_sync(stdout: str) -> None:
    """Both ranks print the same weights fingerprint at the end of training."""
    prints = re.findall(r"rank (\d) weights fingerprint (\S+)", stdout)
    assert sorted(r for r, _ in prints) == ["0", "1"], stdout[-2000:]
    assert prints[0][1] == prints[1][1]


def pretrain_one_and_two_ranks(toy_root, tmp_path, flags):
    """One process with batch 8 and two gloo ranks with batch 4 each (the same global batch);
    returns their output folders."""
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([sys.executable, "main_pretrain.py", *common(toy_root, one, *flags, "--batch_size", "8")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "main_pretrain.py", *common(toy_root, two, *flags, "--batch_size", "4")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "distributed init (rank 0/2, gloo)" in res.stdout
    assert_ranks_in_sync(res.stdout)
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("method", ["segments", "patches"])
def test_two_process_ddp_matches_one_process(toy_root, tmp_path, method):
    flags = ["--mask_method", method, "--epochs", "1", "--warmup_epochs", "0", "--blr", "5e-3"]
    one, two = pretrain_one_and_two_ranks(toy_root, tmp_path, flags)
    a = torch.load(one / "checkpoint-0.pth", weights_only=True)
    b = torch.load(two / "checkpoint-0.pth", weights_only=True)
    assert a["args"].lr == b["args"].lr  # same effective batch, same lr
    if method == "segments":
        # deterministic given the data: the same gradient, up to float summation order
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=2e-5, msg=k)
    else:
        # random patch masks come from each rank's generator, so only the training signal matches
        la = float(open(one / "log.txt").read().split('"train_loss": ')[1].split(",")[0])
        lb = float(open(two / "log.txt").read().split('"train_loss": ')[1].split(",")[0])
        assert abs(la - lb) < 0.1 * la


@pytest.mark.slow
def test_segmenter_evaluation_is_the_same_on_two_ranks(toy_ade20k, pretrained, tmp_path):
    """Each rank scores half the validation images; the summed confusion matrix gives the same mIoU."""
    base = ["--dataset-dir", toy_ade20k, "--backbone", "vit_tiny_patch8", "--decoder", "linear",
            "--crop-size", "32", "--num-workers", "0", "--device", "cpu", "--mae-chp", pretrained["segments"],
            "--eval-only"]
    one = subprocess.run([sys.executable, "-m", "segmenter.train", *base, "--log-dir", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "segmenter.train", *base, "--log-dir", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert a["mIoU"] == pytest.approx(b["mIoU"]) and a["pixel_accuracy"] == pytest.approx(b["pixel_accuracy"])


@pytest.mark.slow
def test_two_process_finetuning_matches_one_process(toy_root, pretrained, tmp_path):
    """Augmentations are seeded per sample, so with drop_path/mixup off two ranks see the same
    global batches as one process and end with the same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--data_path", toy_root, "--model", "vit_tiny_patch8", "--input_size", "32", "--nb_classes", "4",
             "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
             "--finetune", pretrained["segments"], "--drop_path", "0", "--blr", "5e-3", "--dist_eval"]
    res = subprocess.run([sys.executable, "main_finetune.py", *flags, "--batch_size", "8",
                          "--output_dir", str(one), "--log_dir", str(one)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "main_finetune.py", *flags, "--batch_size", "4", "--output_dir", str(two),
                          "--log_dir", str(two)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_ranks_in_sync(res.stdout)
    a = torch.load(one / "checkpoint-0.pth", weights_only=True)["model"]
    b = torch.load(two / "checkpoint-0.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    la = json.loads((one / "log.txt").read_text())
    lb = json.loads((two / "log.txt").read_text())
    assert la["test_acc1"] == pytest.approx(lb["test_acc1"]) and lb["test_count"] == 8


# ------------------------------------------------------------------------------------------------
# every registered method: a step on two gloo ranks equals the step of one process

def _method_step(rank: int, world: int, port: int, out: str) -> None:
    """One SGD step of every registered method, on ``world`` ranks each holding its share of a
    fixed batch of 8 (with the matching share of fixed noise); rank 0 saves the weights."""
    import os

    import torch.distributed as dist
    from test_models_mae import block_mask, tiny
    from torch.nn.parallel import DistributedDataParallel

    import mask_methods
    from engine_pretrain import normalise_by_global_weight
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 16)
    seg = block_mask(8)
    seg[::3, :, 20:30, 2:9] = 1  # the samples hide different areas: the ranks' loss weights differ
    seg[5] = 0  # and one hides nothing
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    weights = {}
    for name in mask_methods.MASK_METHODS:
        model = tiny(name)
        trained = DistributedDataParallel(model) if world > 1 else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss, _, mask = trained(imgs[share], mask_ratio=0.5, noise=noise[share], seg_mask=seg[share])
        if world > 1:
            loss = normalise_by_global_weight(loss, model.loss_weights(mask, seg[share]))
        loss.backward()
        optimizer.step()
        weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(weights, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_method_steps_alike_on_one_and_two_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _method_step(0, 1, port, str(tmp_path / "one.pt"))
    mp.spawn(_method_step, args=(2, port, str(tmp_path / "two.pt")), nprocs=2, join=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(one) == set(two) and {"patches", "segments", "four_channels", "preencoder", "segment_tokens", "blocks",
                                     "blockwise", "noise"} <= set(one)
    for method in one:
        moved = [k for k in one[method] if not torch.equal(one[method][k], tiny_init(method)[k])]
        assert "blocks.0.attn.qkv.weight" in moved, method  # the step changed the encoder
        for k in one[method]:
            torch.testing.assert_close(two[method][k], one[method][k], rtol=1e-5, atol=1e-6, msg=f"{method} {k}")


def tiny_init(method: str) -> dict:
    from test_models_mae import tiny
    return tiny(method).state_dict()
