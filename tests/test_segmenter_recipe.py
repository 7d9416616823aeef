"""The Segmenter's recipe is rstrudel/segmenter's: each item checked against a direct computation
from the original's formulas (written out here), and its checkpoints and variant.yml both ways."""
import argparse
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import segmenter.train
from conftest import REPO
from segmenter.inference import predict
from segmenter.model import build_segmenter
from util.misc import UserError

# ------------------------------------------------------------------------------------------------
# the original's inference, written from its description (segm/model/utils.py)

def original_anchors(length, window, stride):
    return [a for a in range(0, length, stride) if a < length - window] + [length - window]


def original_inference(model, img, out_size, window, stride, n_cls):
    """Upsample when the short side is below the window, slide, average logits, resize, argmax."""
    h, w = img.shape[-2:]
    if min(h, w) < window:
        size = (window, int(w / h * window)) if h < w else (int(h / w * window), window)
        img = F.interpolate(img[None], size, mode="bilinear")[0]
    h, w = img.shape[-2:]
    logit, count = torch.zeros(n_cls, h, w), torch.zeros(1, h, w)
    for a in original_anchors(h, window, stride):
        for b in original_anchors(w, window, stride):
            with torch.no_grad():
                logit[:, a:a + window, b:b + window] += model(img[None, :, a:a + window, b:b + window])[0]
            count[:, a:a + window, b:b + window] += 1
    logit = F.interpolate((logit / count)[None], out_size, mode="bilinear")[0]
    return F.softmax(logit, 0).argmax(0)


def probability_merge(model, img, out_size, window, stride, n_cls):
    """What this repo did before: probabilities averaged and resized."""
    h, w = img.shape[-2:]
    prob, count = torch.zeros(n_cls, h, w), torch.zeros(1, h, w)
    for a in original_anchors(h, window, stride):
        for b in original_anchors(w, window, stride):
            with torch.no_grad():
                prob[:, a:a + window, b:b + window] += model(img[None, :, a:a + window, b:b + window])[0].softmax(0)
            count[:, a:a + window, b:b + window] += 1
    return F.interpolate((prob / count)[None], out_size, mode="bilinear")[0].argmax(0)


class PositionalToy(torch.nn.Module):
    """Logits that depend on the pixel and on its place in the window, so windows disagree."""

    def __init__(self, n_cls=6, window=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, n_cls, 3, padding=1)
        self.bias = torch.nn.Parameter(3 * torch.randn(n_cls, window, window, generator=g))

    def forward(self, x):
        return self.conv(x) + self.bias


def test_windows_merge_logits_then_resize_then_argmax():
    torch.manual_seed(0)
    model, img = PositionalToy(), torch.randn(3, 16, 40)  # windows at columns 0, 16, 24: overlaps
    ours = predict(model, img, (24, 60), 6, window_size=16, window_stride=16)
    assert torch.equal(ours, original_inference(model, img, (24, 60), 16, 16, 6))
    differs = (probability_merge(model, img, (24, 60), 16, 16, 6) != ours).float().mean()
    assert differs > 0.01  # the old merge gives other classes where windows overlap


def test_an_image_smaller_than_the_window_is_upsampled_not_padded():
    torch.manual_seed(1)
    model, img = PositionalToy(window=32), torch.randn(3, 20, 70)
    ours = predict(model, img, (20, 70), 6, window_size=32, window_stride=32)
    assert torch.equal(ours, original_inference(model, img, (20, 70), 32, 32, 6))
    tall = torch.randn(3, 70, 20)
    assert torch.equal(predict(model, tall, (70, 20), 6, 32, 24), original_inference(model, tall, (70, 20), 32, 24, 6))


# ------------------------------------------------------------------------------------------------
# the decoder: the original's block (segm/model/blocks.py) written out

def original_block(blk, x, eps):
    def ln(norm, t):
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, eps)
    b, n, c = x.shape
    heads = blk.attn.num_heads
    qkv = blk.attn.qkv(ln(blk.norm1, x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
    x = x + blk.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(ln(blk.norm2, x))))


def test_mask_transformer_block_has_the_originals_eps_and_attention_dropout():
    torch.manual_seed(0)
    model = build_segmenter("vit_tiny_patch8", "mask_transformer", 150, 32).eval()
    blk = model.decoder.blocks[0]
    x = 1e-3 * torch.randn(2, 20, 192)  # tiny variance: eps 1e-5 and 1e-6 give different outputs
    with torch.no_grad():
        torch.testing.assert_close(blk(x), original_block(blk, x, 1e-5), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(blk(x), original_block(blk, x, 1e-6), rtol=1e-4, atol=1e-5)
    assert model.decoder.decoder_norm.eps == model.decoder.mask_norm.eps == 1e-5
    assert all(m.eps == 1e-6 for m in model.encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    # dropout 0.1 on the attention weights: with every other dropout off, training passes still differ
    assert blk.attn.attn_drop.p == 0.1 and blk.attn.proj_drop.p == 0.1
    blk.train()
    for m in (blk.attn.proj_drop, blk.mlp.drop1, blk.mlp.drop2):
        m.p = 0.0
    x = torch.randn(2, 20, 192)
    assert not torch.equal(blk(x), blk(x))
    blk.attn.attn_drop.p = 0.0
    torch.testing.assert_close(blk(x), blk(x))


# ------------------------------------------------------------------------------------------------
# position embeddings: bilinear, as the original's resize_pos_embed

def bilinear_pos(pos, old, new):
    grid = pos[:, 1:].reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bilinear").permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)
    return torch.cat([pos[:, :1], grid], dim=1)


def test_position_embeddings_are_resized_bilinearly_on_the_fly():
    torch.manual_seed(0)
    enc = build_segmenter("vit_tiny_patch8", "linear", 150, 32).encoder.eval()  # grid 4x4
    img = torch.randn(1, 3, 48, 24)  # grid 6x3
    with torch.no_grad():
        x = enc.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([enc.cls_token, x], dim=1) + bilinear_pos(enc.pos_embed, (4, 4), (6, 3))
        for blk in enc.blocks:
            x = blk(x)
        torch.testing.assert_close(enc.forward_features(img), enc.norm(x), rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_resized_bilinearly_when_loading(pretrained):
    from models_vit import load_pretrained_encoder
    enc = build_segmenter("vit_tiny_patch8", "linear", 150, 48).encoder  # 6x6, pretrained at 4x4
    load_pretrained_encoder(enc, pretrained["patches"])
    pos = torch.load(pretrained["patches"], weights_only=False)["model"]["pos_embed"]
    torch.testing.assert_close(enc.pos_embed.data, bilinear_pos(pos, (4, 4), (6, 6)))


# ------------------------------------------------------------------------------------------------
# optimizer and batch

def test_sgd_is_nesterov_by_default():
    args = segmenter.train.get_args_parser().parse_args(["--dataset-dir", "x", "--log-dir", "y"])
    lin = torch.nn.Linear(3, 2)
    p0 = [p.detach().clone() for p in lin.parameters()]
    opt = segmenter.train.build_optimizer(lin, args)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 0 and opt.param_groups[0]["lr"] == 0.001
    grads = [[torch.randn_like(p) for p in p0] for _ in range(3)]
    for g in grads:
        for p, gi in zip(lin.parameters(), g):
            p.grad = gi.clone()
        opt.step()
    for i, p in enumerate(lin.parameters()):  # v = mu v + g; p -= lr (g + mu v)
        v, expected = torch.zeros_like(p0[i]), p0[i].clone()
        for g in grads:
            v = 0.9 * v + g[i]
            expected -= 0.001 * (g[i] + 0.9 * v)
        torch.testing.assert_close(p.detach(), expected)
    args.optimizer = "momentum"
    assert not segmenter.train.build_optimizer(lin, args).param_groups[0]["nesterov"]


def test_a_global_batch_that_does_not_split_is_an_error(monkeypatch):
    monkeypatch.setattr(segmenter.train, "get_world_size", lambda: 3)
    with pytest.raises(UserError, match="--batch-size 8 is the global batch and does not split over 3 processes"):
        segmenter.train.per_rank_batch(argparse.Namespace(batch_size=8))
    assert segmenter.train.per_rank_batch(argparse.Namespace(batch_size=9)) == 3


def labelled_everywhere_ade(root, n_train=8, n_val=2):
    """An ADE20k folder whose labels are never 0 ("other"): every pixel counts in the loss, so two
    ranks' averaged losses equal one process's."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
        for i in range(n):
            label = np.kron(rng.integers(1, 5, (4, 4)), np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
            img = (label[..., None] * 50 + rng.integers(0, 30, (64, 64, 3))).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "annotations" / split / f"{i:03d}.png")
    return str(root)


@pytest.mark.slow
def test_two_ranks_with_batch_8_train_as_one_process(tmp_path, pretrained):
    data = labelled_everywhere_ade(tmp_path / "ade")
    base = ["-m", "segmenter.train", "--dataset-dir", data, "--backbone", "vit_tiny_patch8", "--decoder", "linear",
            "--crop-size", "32", "--n-cls", "4", "--epochs", "2", "--eval-freq", "2", "--batch-size", "8",
            "--lr", "0.05", "--drop-path", "0", "--num-workers", "0", "--device", "cpu", "--print-freq", "1",
            "--mae-chp", pretrained["patches"]]
    one = subprocess.run([sys.executable, *base, "--log-dir", str(tmp_path / "one")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *base, "--log-dir", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stdout[-2000:] + two.stderr[-2000:]
    assert "batch 8 global = 4 per process x 2 processes" in two.stdout
    lrs = [re.findall(r"Epoch: \[\d\] \[\d+/(\d+)\].*?lr: ([\d.]+)", p.stdout) for p in (one, two)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 2 and lrs[0][0][0] == "1"  # 1 step per epoch, same lr
    a = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=False)["model"]
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
    p0 = build_segmenter("vit_tiny_patch8", "linear", 4, 32).state_dict()
    moved = sum(not torch.equal(a[k], p0[k]) for k in p0 if "head" not in k and k in a)
    assert moved > 10


# ------------------------------------------------------------------------------------------------
# checkpoints in the original's layout, both ways

ORIGINAL_VARIANT = """\
dataset_kwargs:
  batch_size: 1
  crop_size: 32
  dataset: ade20k
  image_size: 32
  normalization: vit
  num_workers: 10
  split: train
inference_kwargs:
  im_size: 32
  window_size: 32
  window_stride: 32
net_kwargs:
  backbone: vit_tiny_patch16_384
  d_model: 192
  decoder:
    drop_path_rate: 0.0
    dropout: 0.1
    n_layers: 2
    name: mask_transformer
  distilled: false
  drop_path_rate: 0.1
  dropout: 0.0
  image_size: !!python/tuple
  - 32
  - 32
  n_cls: 150
  n_heads: 3
  n_layers: 12
  normalization: vit
  patch_size: 8
world_batch_size: 8
"""


def original_keys(depth, decoder, n_dec_layers=2):
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
            "encoder.norm.weight", "encoder.norm.bias", "encoder.head.weight", "encoder.head.bias"]
    keys += [f"encoder.blocks.{i}.{k}" for i in range(depth) for k in block]
    if decoder == "linear":
        return set(keys + ["decoder.head.weight", "decoder.head.bias"])
    keys += ["decoder.cls_emb", "decoder.proj_dec.weight", "decoder.proj_dec.bias", "decoder.proj_patch",
             "decoder.proj_classes", "decoder.decoder_norm.weight", "decoder.decoder_norm.bias",
             "decoder.mask_norm.weight", "decoder.mask_norm.bias"]
    return set(keys + [f"decoder.blocks.{i}.{k}" for i in range(n_dec_layers) for k in block])


def test_a_checkpoint_of_the_original_evaluates(tmp_path, toy_ade20k, capsys):
    torch.manual_seed(0)
    model = build_segmenter("vit_tiny_patch8", "mask_transformer", 150, 32)
    sd = {**model.state_dict(), "encoder.head.weight": torch.randn(1000, 192), "encoder.head.bias": torch.zeros(1000)}
    assert set(sd) == original_keys(12, "mask_transformer")
    n_params = len(list(model.parameters())) + 2
    folder = tmp_path / "seg_tiny_mask"
    folder.mkdir()
    torch.save({"model": sd, "n_cls": 150, "epoch": 63,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "momentum": 0.9, "nesterov": True,
                                                             "weight_decay": 0.0, "params": list(range(n_params))}]},
                "lr_scheduler": {"step_size": 1, "iter_warmup": 0, "iter_max": 100, "power": 0.9, "min_lr": 1e-5,
                                 "base_lrs": [0.001], "last_epoch": 100}}, folder / "checkpoint.pth")
    (folder / "variant.yml").write_text(ORIGINAL_VARIANT)
    metrics = segmenter.train.cli(["--dataset-dir", toy_ade20k, "--log-dir", str(folder), "--eval-only",
                                   "--num-workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "in rstrudel/segmenter's layout: its weights are loaded, its optimizer and lr_scheduler state are not" in out
    assert "--normalization vit taken from" in out and "--encoder-norm-eps 1e-05 taken from" in out
    # the same computation by hand: the original's eps, 0.5/0.5 normalisation, logit merging
    model.eval()
    for m in model.encoder.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    from segmenter.data import ADE20K, SegEvalTransform
    from segmenter.metrics import ConfusionMatrix
    cm = ConfusionMatrix(150, torch.device("cpu"))
    for img, label in ADE20K(toy_ade20k, "val", SegEvalTransform(32, normalization="vit")):
        cm.update(original_inference(model, img, label.shape[-2:], 32, 32, 150), label)
    assert metrics["mIoU"] == pytest.approx(cm.compute()["mIoU"], abs=1e-9)
    assert json.loads((folder / "metrics.json").read_text())["epoch"] == 63


def test_without_variant_yml_the_settings_come_from_the_shapes(tmp_path, toy_ade20k, capsys):
    model = build_segmenter("vit_tiny_patch8", "linear", 150, 48)
    sd = {**model.state_dict(), "encoder.head.weight": torch.zeros(1000, 192), "encoder.head.bias": torch.zeros(1000)}
    torch.save({"model": sd, "n_cls": 150, "epoch": 3, "optimizer": {}, "lr_scheduler": {}},
               tmp_path / "checkpoint.pth")
    segmenter.train.cli(["--dataset-dir", toy_ade20k, "--log-dir", str(tmp_path), "--eval-only",
                         "--num-workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    for line in ("--backbone vit_tiny_patch8 taken", "--decoder linear taken", "--crop-size 48 taken",
                 "no variant.yml beside it: input normalisation 'vit'"):
        assert line in out


def test_our_folder_is_what_the_originals_load_model_reads(tmp_path, toy_ade20k):
    log = tmp_path / "seg"
    segmenter.train.cli(["--dataset-dir", toy_ade20k, "--log-dir", str(log), "--backbone", "vit_tiny_patch8",
                         "--decoder", "mask_transformer", "--crop-size", "32", "--epochs", "1", "--batch-size", "8",
                         "--num-workers", "0", "--device", "cpu"])
    with open(log / "variant.yml") as f:
        variant = yaml.load(f, Loader=yaml.FullLoader)  # as the original's load_model reads it
    net = variant["net_kwargs"]
    # create_segmenter pops decoder, create_vit pops backbone and normalization, the rest goes to
    # its VisionTransformer(image_size, patch_size, n_layers, d_model, d_ff, n_heads, n_cls, dropout,
    # drop_path_rate, distilled, channels)
    assert set(net) - {"decoder", "backbone", "normalization"} <= {
        "image_size", "patch_size", "n_layers", "d_model", "n_heads", "n_cls", "dropout", "drop_path_rate",
        "distilled", "channels"}
    assert (net["image_size"], net["patch_size"], net["d_model"], net["n_heads"], net["n_layers"], net["n_cls"]) == \
        ([32, 32], 8, 192, 3, 12, 150)
    assert net["decoder"] == {"name": "mask_transformer", "drop_path_rate": 0.0, "dropout": 0.1, "n_layers": 2}
    assert variant["dataset_kwargs"]["normalization"] == "deit" and variant["dataset_kwargs"]["crop_size"] == 32
    assert variant["world_batch_size"] == 8 and variant["inference_kwargs"]["window_stride"] == 32
    sd = torch.load(log / "checkpoint.pth", weights_only=False)["model"]
    assert set(sd) == original_keys(12, "mask_transformer")  # strict load into the original's model
    assert sd["encoder.head.weight"].shape == (1000, 192) and not sd["encoder.head.weight"].any()
    assert sd["encoder.pos_embed"].shape == (1, 1 + (32 // 8) ** 2, 192) and math.isfinite(float(sd["decoder.cls_emb"].sum()))
    # and it evaluates here again (its head dropped)
    segmenter.train.cli(["--dataset-dir", toy_ade20k, "--log-dir", str(log), "--eval-only", "--num-workers", "0",
                         "--device", "cpu"])
