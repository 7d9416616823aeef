"""Checkpoints of the original segmae code (DeinAlptraum/mae) keep their meaning here: its
four_channels 4th channel is the hidden mask m (converted exactly to this repo's v = 1 - m), its
preencoder checkpoints are a CombinedModel whose encoder works downstream."""
import argparse
import json
import re

import pytest
import torch
from test_finetune import downstream
from test_pretrain_cli import common

import main_finetune
import main_pretrain
import models_mae
import models_vit
from evals import knn
from models_vit import (AdaptationError, checkpoint_origin, encoder_state_dict, fourth_channel, load_pretrained_encoder,
                        mae_state_dict)
from run.checkpoint import load_checkpoint
from tools import export, visualize


def original_args(method, **kw):
    """What the original main_pretrain.py stores as 'args': its flags, none of this repo's."""
    a = dict(batch_size=8, epochs=1, accum_iter=1, model="mae_vit_tiny_patch8", input_size=32, mask_ratio=0.75,
             mask_method=method, stack=False, coverage_ratio=30.0, decoder_depth=4, norm_pix_loss=False,
             weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0, warmup_epochs=0, data_path="/data", output_dir="o",
             log_dir="o", device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True,
             world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://")
    a.update(kw)
    return argparse.Namespace(**a)


def original_four_channels(path):
    """A four_channels checkpoint as the original writes it: its patch embedding sees
    concat(x * (1 - m), m). A random (non-zero) 4th-channel kernel and bias."""
    torch.manual_seed(0)
    mae = models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method="four_channels")
    with torch.no_grad():
        mae.patch_embed.proj.weight[:, 3].normal_(0, 0.05)
        mae.patch_embed.proj.bias.normal_(0, 0.05)
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 0, "scaler": {},
                "args": original_args("four_channels")}, path)
    return mae


def original_preencoder(path):
    """CombinedModel(preencoder, model): model.* a 3-channel MAE, encoder.* Conv2d(4, 3, 16, 'same')."""
    torch.manual_seed(1)
    mae = models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method="segments")
    conv = torch.nn.Conv2d(4, 3, kernel_size=16, padding="same")
    sd = {f"model.{k}": v for k, v in mae.state_dict().items()}
    sd.update({f"encoder.{k}": v for k, v in conv.state_dict().items()})
    torch.save({"model": sd, "optimizer": {}, "epoch": 0, "scaler": {}, "args": original_args("preencoder")}, path)
    return mae


def test_origin_is_detected_and_this_repo_writes_its_convention(pretrained, tmp_path):
    ours = load_checkpoint(pretrained["four_channels"])
    assert ours["args"].fourth_channel == "visible" and checkpoint_origin(ours) == "repo"
    original_four_channels(tmp_path / "o.pth")
    theirs = load_checkpoint(str(tmp_path / "o.pth"))
    assert checkpoint_origin(theirs) == "segmae" and fourth_channel(theirs) == "hidden"
    assert checkpoint_origin({"model": {}}) == "reference"
    assert checkpoint_origin({"model": {}, "args": argparse.Namespace(model="mae_vit_base_patch16")}) == "reference"
    # a checkpoint of this repo from before the marker: its args have this repo's flags
    older = {"model": {}, "args": argparse.Namespace(mask_method="four_channels", in_chans=4, data_timeout=120)}
    assert fourth_channel(older) == "visible"
    # declaring the convention: used where the file does not say, refused where it contradicts
    assert fourth_channel(theirs, "visible") == "visible"
    with pytest.raises(AdaptationError, match="contradicts"):
        fourth_channel(ours, "hidden")


def test_original_four_channels_converts_exactly(tmp_path):
    path = tmp_path / "o.pth"
    original = original_four_channels(path).eval()
    ckpt = load_checkpoint(str(path))
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32)
    m = (torch.rand(3, 1, 32, 32) > 0.6).float()
    # pretraining level: the original's patch embedding of concat(x*(1-m), m) = ours of concat(x*v, v)
    theirs = original.patch_embed(torch.cat([x * (1 - m), m], dim=1))
    converted = models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method="four_channels").eval()
    converted.load_state_dict(mae_state_dict(ckpt, str(path)))
    ours = converted.patch_embed(torch.cat([x * (1 - m), 1 - m], dim=1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # without conversion the meaning would be wrong (the test would notice)
    raw = models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method="four_channels").eval()
    raw.load_state_dict(ckpt["model"])
    assert not torch.allclose(raw.patch_embed(torch.cat([x * (1 - m), 1 - m], dim=1)), theirs, atol=1e-3)
    # downstream: the original feeds m = 0 (nothing hidden); here v = 1 (kept) or folded (3 channels)
    original_vit = models_vit.vit_tiny_patch8(img_size=32, num_classes=0, in_chans=4).eval()
    original_vit.load_state_dict({k: v for k, v in ckpt["model"].items()
                                  if not k.startswith(("decoder_", "mask_token"))}, strict=False)
    expected = original_vit.forward_features(torch.cat([x, torch.zeros_like(m)], dim=1))
    for fold, chans, feed in ((False, 4, torch.cat([x, torch.ones_like(m)], dim=1)), (True, 3, x)):
        vit = models_vit.vit_tiny_patch8(img_size=32, num_classes=0, in_chans=chans).eval()
        load_pretrained_encoder(vit, str(path), fold_mask_channel=fold)
        torch.testing.assert_close(vit.forward_features(feed), expected, rtol=0, atol=1e-5)


def test_original_checkpoints_downstream_end_to_end(toy_root, tmp_path, capsys):
    four, pre = tmp_path / "four.pth", tmp_path / "pre.pth"
    original_four_channels(four)
    inner = original_preencoder(pre)
    # finetuning (the CLI) from both
    for path in (four, pre):
        out = tmp_path / f"ft_{path.stem}"
        main_finetune.cli(downstream(toy_root, out, "--finetune", str(path)))
        assert json.loads((out / "log.txt").read_text().splitlines()[-1])["test_acc5"] == 100.0
    said = capsys.readouterr().out
    assert "4th channel converted from the original segmae convention" in said
    assert "a preencoder checkpoint of the original segmae code; its MAE's encoder is used" in said
    # the preencoder's encoder is the inner MAE's, the pre-encoder dropped
    sd = encoder_state_dict(load_checkpoint(str(pre)), "preencoder", path=str(pre))
    assert not any(k.startswith(("encoder.", "model.", "decoder_", "preencoder")) for k in sd)
    torch.testing.assert_close(sd["blocks.0.attn.qkv.weight"], inner.state_dict()["blocks.0.attn.qkv.weight"])
    # the Segmenter's encoder, kNN and export take them too
    from segmenter.model import build_segmenter
    seg = build_segmenter("vit_tiny_patch8", "linear", 150, 32)
    assert load_pretrained_encoder(seg.encoder, str(pre))[0] == "preencoder"
    for path in (four, pre):
        result = knn.cli(["--checkpoint", str(path), "--data_path", toy_root, "--bank_per_class", "4",
                          "--num_workers", "0", "--device", "cpu"])
        assert 0 <= result["knn_top1"] <= 100
        files = export.main(["--checkpoint", str(path), "--to", "encoder", "--out", str(tmp_path / f"ex_{path.stem}")])
        exported = torch.load(files[0], weights_only=True)["model"]
        assert exported["patch_embed.proj.weight"].shape[1] == 3


def test_continuing_original_checkpoints(toy_root, tmp_path, capsys):
    four, pre = tmp_path / "four.pth", tmp_path / "pre.pth"
    original_four_channels(four)
    original_preencoder(pre)
    for flag, path, method, message in (
            ("--resume", pre, "preencoder", "preencoder checkpoint of the original segmae code.*cannot be continued"),
            ("--stack", pre, "preencoder", "preencoder checkpoint of the original segmae code.*cannot be continued"),
            ("--resume", four, "four_channels", "its optimizer state belongs to that parametrisation.*--stack")):
        with pytest.raises(SystemExit):
            main_pretrain.cli(common(toy_root, tmp_path / f"c_{flag}_{method}", "--mask_method", method, flag,
                                     str(path)))
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(AdaptationError, match="cannot be continued \\(or reconstructed\\) here"):
        visualize.main(["--checkpoint", str(pre), "--data_path", toy_root, "--out", str(tmp_path / "vis")])
    # --stack: the original four_channels weights, converted, continue with a fresh optimizer
    out = tmp_path / "stacked"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "four_channels", "--stack", str(four)))
    assert "4th channel converted" in capsys.readouterr().out
    assert load_checkpoint(str(out / "checkpoint-0.pth"))["args"].fourth_channel == "visible"
