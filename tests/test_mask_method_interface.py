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
from mask_methods import Flag, MaskMethod, get_method, register
from sam.layouts import segment_mask


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


# ------------------------------------------------------------------------------------------------
# a method with its own flag and its own choice of segment, defined here alone

class LargeRandomSegment(MaskMethod):
    """Toy: hides one segment drawn at random (a new one each epoch, the same on any number of
    ranks) among those covering at least --min_coverage percent of the image."""

    name = "toy_large_random_segment"
    flags = (Flag("min_coverage", float, 5.0, "percent a segment must cover to be drawn"), masking.SEG_LOSS)

    def hidden_segment(self, segments, image_size, generator=None):
        eligible = [i for i, c in enumerate(segments.coverages) if c >= self.min_coverage]
        if not eligible:
            return segment_mask(None, image_size)
        i = eligible[int(torch.randint(len(eligible), (1,), generator=generator))]
        return segment_mask(segments[i], image_size)

    def cached_coverage(self):
        return None  # the compact cache holds one segment per image: it cannot serve a random draw


@pytest.fixture
def toy_random():
    register(LargeRandomSegment)
    yield LargeRandomSegment.name
    masking.REGISTRY.pop(LargeRandomSegment.name)
    masking.MASK_METHODS.remove(LargeRandomSegment.name)


def test_a_method_owns_its_flag_and_its_segment_choice(toy_random, toy_root, tmp_path, capsys):
    from inputs.pretrain import SegmentMaskImageFolder
    method = get_method(toy_random, min_coverage=10.0)
    folder = SegmentMaskImageFolder(toy_root, with_masks=True, segment_choice=method)
    rel = folder.rel_paths[0]
    segments = folder.source.segments(rel)
    drawn = {int(method.hidden_segment(segments, (32, 32), torch.Generator().manual_seed(s)).sum())
             for s in range(40)}
    allowed = {int(segments[i].decode().sum()) for i, c in enumerate(segments.coverages) if c >= 10.0}
    assert drawn == allowed and len(allowed) > 1  # every large segment, nothing else
    same = [folder.read(0, torch.Generator().manual_seed(7))[1] for _ in range(2)]
    assert (same[0] == same[1]).all()  # the choice depends on the sample's generator alone

    out = tmp_path / "pre"
    run = common(toy_root, out, "--mask_method", toy_random, "--min_coverage", "10", "--epochs", "2")
    main_pretrain.cli(run + ["--stop_epoch", "1"])
    saved = torch.load(out / "checkpoint-0.pth", weights_only=False)["args"]
    assert saved.min_coverage == 10.0 and saved.config["method"] == {"min_coverage": 10.0, "seg_loss": "pixel"}
    # resume: the flag left out comes from the checkpoint; another value is refused
    resume = [a for a in run if a not in ("--min_coverage", "10")]
    main_pretrain.cli(resume)
    assert "--min_coverage 10.0 taken from" in capsys.readouterr().out
    assert torch.load(out / "checkpoint-1.pth", weights_only=False)["args"].min_coverage == 10.0
    with pytest.raises(SystemExit):
        main_pretrain.cli(common(toy_root, out, "--mask_method", toy_random, "--min_coverage", "20", "--epochs", "3"))
    assert "trained with --min_coverage 10.0" in capsys.readouterr().err
    # another method's run names the flag as ignored
    main_pretrain.cli(common(toy_root, tmp_path / "p", "--min_coverage", "20"))
    assert f"--min_coverage is ignored by --mask_method patches (a flag of {toy_random})" in capsys.readouterr().err
    # finetuning and evaluation take it like any other method's checkpoint
    main_finetune.cli(downstream(toy_root, tmp_path / "ft", "--finetune", str(out / "checkpoint-1.pth")))
    assert torch.load(tmp_path / "ft" / "checkpoint-0.pth", weights_only=False)["args"].mask_method == toy_random
    result = knn.cli(["--checkpoint", str(out / "checkpoint-1.pth"), "--data_path", toy_root, "--bank_per_class",
                      "4", "--num_workers", "0", "--device", "cpu"])
    assert 0 <= result["knn_top1"] <= 100 and result["method"] == toy_random


def test_methods_declare_shared_flags_alike():
    class Clash(MaskMethod):
        name = "toy_clash"
        flags = (Flag("coverage_ratio", float, 10.0, "another default"),)
    with pytest.raises(ValueError, match="declares --coverage_ratio unlike"):
        register(Clash)
    assert "toy_clash" not in masking.REGISTRY
    with pytest.raises(ValueError, match="has no parameter block_size"):
        get_method("segments", block_size=4)
