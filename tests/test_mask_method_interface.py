"""A mask method is one class: a toy fifth method, defined in this file alone, pretrains, finetunes,
feeds kNN and the Segmenter, and draws its pictures, through the registry and nothing else."""
import json

import pytest
import torch
from test_finetune import downstream
from test_pretrain_cli import common

import main_finetune
import main_pretrain
import mask_methods as masking
import models_mae
from evals import knn
from mask_methods import MaskMethod, get_method, register


class Outline(MaskMethod):
    """Toy: hides the segment and gives the encoder only the segment's outside, as two channels
    of visibility (the plain one and its copy): a method with 2 mask channels."""

    name = "toy_two_channels"
    mask_channels = 2
    hidden_label = "toy segment"

    def encoder_input(self, imgs, seg_mask):
        visible = 1.0 - masking.as_nchw(seg_mask).to(imgs.dtype)
        return torch.cat([imgs * visible, visible, visible], dim=1)


@pytest.fixture
def toy_method():
    register(Outline)
    yield Outline.name
    masking.REGISTRY.pop(Outline.name)
    masking.MASK_METHODS.remove(Outline.name)


def test_the_registry_knows_the_four_methods():
    assert masking.MASK_METHODS[:4] == ["patches", "segments", "four_channels", "preencoder"]
    assert [get_method(n).needs_segment for n in masking.MASK_METHODS[:4]] == [False, True, True, True]
    assert [get_method(n).encoder_in_chans() for n in masking.MASK_METHODS[:4]] == [3, 3, 4, 3]
    with pytest.raises(ValueError, match="unknown mask_method 'nope'; choose one of patches"):
        get_method("nope")


def test_a_fifth_method_is_one_class(toy_method, toy_root, tmp_path):
    model = models_mae.build_mae("mae_vit_tiny_patch8", img_size=32, mask_method=toy_method)
    assert model.patch_embed.proj.in_channels == 5 and model.preencoder is None
    out = tmp_path / "pre"
    main_pretrain.cli(common(toy_root, out, "--mask_method", toy_method, "--coverage_ratio", "30"))
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=False)
    assert ckpt["args"].mask_method == toy_method and ckpt["args"].in_chans == 5
    log = json.loads((out / "log.txt").read_text())
    assert "train_empty_segments" in log and log["train_loss"] > 0
    # downstream: the two mask channels fold into a plain 3-channel ViT, or stay (fed 1)
    main_finetune.cli(downstream(toy_root, tmp_path / "ft", "--finetune", str(out / "checkpoint-0.pth")))
    assert torch.load(tmp_path / "ft" / "checkpoint-0.pth", weights_only=True)["model"][
        "patch_embed.proj.weight"].shape[1] == 3
    main_finetune.cli(downstream(toy_root, tmp_path / "ft5", "--finetune", str(out / "checkpoint-0.pth"),
                                 "--no_fold_mask_channel"))
    assert torch.load(tmp_path / "ft5" / "checkpoint-0.pth", weights_only=False)["args"].in_chans == 5
    result = knn.cli(["--checkpoint", str(out / "checkpoint-0.pth"), "--data_path", toy_root, "--bank_per_class",
                      "4", "--num_workers", "0", "--device", "cpu"])
    assert 0 <= result["knn_top1"] <= 100
    # the Segmenter's encoder (folded) and the pictures
    from models_vit import load_pretrained_encoder
    from segmenter.model import build_segmenter
    from tools import visualize
    seg = build_segmenter("vit_tiny_patch8", "linear", 150, 32)
    assert load_pretrained_encoder(seg.encoder, str(out / "checkpoint-0.pth"))[0] == toy_method
    written = visualize.main(["--checkpoint", str(out / "checkpoint-0.pth"), "--data_path", toy_root, "--num", "1",
                              "--out", str(tmp_path / "vis")])
    assert len(written) == 1 and written[0].endswith(f"_{toy_method}.png")
