"""First contact with files, exports and pictures: the tools say what they do with what a user
brings (docs/RELIABILITY.md, "First contact: files, exports and pictures")."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import features_of_ours
from timm.data.constants import IMAGENET_DEFAULT_MEAN

import models_mae
from conftest import REPO
from run.checkpoint import atomic_torch_save, load_checkpoint, saved_args
from tools import convert_masks, export, visualize
from util.misc import UserError

WEIRD = "data $(touch pwned) it's"


# ---- convert_masks.py: nothing to convert, and commands that run as printed ---------------------------------

def test_convert_masks_on_sam_json_says_nothing_to_convert(toy_root, tmp_path, capsys):
    root = tmp_path / WEIRD
    shutil.copytree(toy_root, root)
    before = sorted(os.listdir(root))
    summary = convert_masks.main(["--data_path", str(root), "--workers", "1"])
    out = capsys.readouterr().out
    assert summary["format"] == "json" and summary["converted"] == 0
    assert "already SAM's JSON layout" in out and "nothing to convert" in out
    assert "mv " not in out and "To train on them" not in out
    assert sorted(os.listdir(root)) == before  # no masks_json written beside masks/
    # --out given: still nothing to write
    convert_masks.main(["--data_path", str(root), "--out", str(tmp_path / "elsewhere")])
    assert "nothing to convert" in capsys.readouterr().out and not (tmp_path / "elsewhere").exists()


# ---- export --to hf: loads whole, with its image processor ---------------------------------------------------

def vit_recipe_checkpoint(path: str, out) -> str:
    """The same encoder recorded as pretrained with the 'vit' normalisation (0.5 / 0.5)."""
    ckpt = load_checkpoint(path)
    args = argparse.Namespace(**saved_args(ckpt))
    args.normalization = "vit"
    if isinstance(getattr(args, "config", None), dict):
        args.config = {**args.config, "normalization": "vit"}
    ckpt["args"] = args
    atomic_torch_save(ckpt, str(out))
    return str(out)


def test_hf_export_loads_whole_with_its_image_processor(pretrained, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, ViTModel
    ours, _ = features_of_ours(pretrained["four_channels"])
    for name, ckpt, mean in (("imagenet", pretrained["four_channels"], IMAGENET_DEFAULT_MEAN),
                             ("vit", vit_recipe_checkpoint(pretrained["four_channels"], tmp_path / "vit.pth"),
                              (0.5, 0.5, 0.5))):
        out = tmp_path / name
        export.main(["--checkpoint", ckpt, "--to", "hf", "--out", str(out)])
        for loader in (ViTModel, AutoModel):
            model, info = loader.from_pretrained(str(out), output_loading_info=True)
            assert type(model) is ViTModel
            assert not any(info.values()), info  # nothing missing, unexpected, mismatched or newly initialised
        model.eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            hf = model(pixel_values=x)
            assert (hf.last_hidden_state - ours.forward_features(x)).abs().max() <= 1e-5
            assert torch.equal(hf.pooler_output, hf.last_hidden_state[:, 0])  # the final [CLS] token, not random
        processor = AutoImageProcessor.from_pretrained(str(out))
        assert list(processor.image_mean) == pytest.approx(list(mean)) and processor.size["height"] == 32
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8))
        pixels = processor(images=photo, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 32, 32)
        expected = (torch.from_numpy(np.array(photo.resize((32, 32), Image.BICUBIC))).permute(2, 0, 1) / 255
                    - torch.tensor(mean)[:, None, None]) / torch.tensor(processor.image_std)[:, None, None]
        assert (pixels[0] - expected).abs().max() < 0.05


def test_hf_export_prints_no_torchao_deprecation(pretrained, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export.py"), "--checkpoint",
                          pretrained["patches"], "--to", "hf", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "Enum subclass" not in run.stderr and "deprecated" not in run.stderr, run.stderr


# ---- export --to timm: the documented calls load every exported model -----------------------------------------

def tiny_checkpoint_at(size: int, out) -> str:
    """A patches checkpoint of mae_vit_tiny_patch8 (random weights) recorded as pretrained at size x size."""
    torch.manual_seed(0)
    model = models_mae.build_mae("mae_vit_tiny_patch8", img_size=(size, size), mask_method="patches")
    args = argparse.Namespace(model="mae_vit_tiny_patch8", mask_method="patches", input_size=[size, size])
    atomic_torch_save({"model": model.state_dict(), "epoch": 0, "args": args}, str(out))
    return str(out)


def test_timm_export_documented_calls_load_models_other_than_vit_b16(pretrained, tmp_path, capsys):
    import timm
    for size, ckpt in ((32, pretrained["patches"]), (64, tiny_checkpoint_at(64, tmp_path / "ck64.pth"))):
        out = tmp_path / f"timm{size}"
        export.main(["--checkpoint", ckpt, "--to", "timm", "--out", str(out)])
        printed = capsys.readouterr().out.splitlines()
        [at] = [i for i, line in enumerate(printed) if line.endswith("load it with timm (README.md there has the call "
                                                                      "at another size):")]
        call = printed[at + 1].strip()
        readme = (out / "README.md").read_text()
        at_size, other = [line[len("model = "):] for line in readme.splitlines() if line.startswith("model = ")]
        assert call == at_size and "patch_size=8" in call and f"img_size={size}," in call
        cfg = json.load(open(out / "config.json"))
        file = str(out / "model.safetensors")
        ours, _ = features_of_ours(ckpt)
        x = torch.randn(2, 3, size, size)
        loaded = {
            "printed": eval(call, {"timm": timm}),
            # the form docs/DOWNSTREAM.md documents for any export: name and model_args from config.json
            "config": timm.create_model(cfg["architecture"], num_classes=0, checkpoint_path=file, **cfg["model_args"]),
            "overlay": timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                                         pretrained_cfg_overlay=dict(file=file, num_classes=0), **cfg["model_args"]),
            "local-dir": timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0),
        }
        with torch.no_grad():
            for how, model in loaded.items():
                assert (model.eval().forward_features(x) - ours.forward_features(x)).abs().max() <= 1e-5, (size, how)
        # a 224 request: the README's second call, the config form with img_size=224, and local-dir
        at224 = [eval(other, {"timm": timm}),
                 timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=file, num_classes=0),
                                   **{**cfg["model_args"], "img_size": 224}),
                 timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0, img_size=224)]
        for model in at224:
            assert model.patch_embed.patch_size == (8, 8) and model.pos_embed.shape[1] == 1 + 28 * 28
            with torch.no_grad():
                assert model.eval().forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1 + 28 * 28, 192)
            assert torch.equal(model.cls_token, ours.cls_token)  # the exported weights, not a fresh init


# ---- notebooks/visualize.ipynb with its defaults, after `make demo` -------------------------------------------

def demo_checkout(tmp_path, toy_root, checkpoint: str):
    """A checkout after `make demo`: the repository's files, data/toy and two benchmark runs in
    output_demo/pretrain_output/<run id>/ (the older one written first)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in os.listdir(REPO):
        if name not in ("output_demo", "data", ".git", "notebooks"):
            os.symlink(os.path.join(REPO, name), repo / name)
    shutil.copytree(os.path.join(REPO, "notebooks"), repo / "notebooks")  # a real folder: the kernel's cwd
    shutil.copytree(toy_root, repo / "data" / "toy")
    runs = repo / "output_demo" / "pretrain_output"
    for run, epochs in (("segments-1a2b3c4d", (5,)), ("four_channels-5e6f7a8b", (5, 11))):
        for epoch in epochs:
            (runs / run).mkdir(parents=True, exist_ok=True)
            shutil.copy(checkpoint, runs / run / f"checkpoint-{epoch}.pth")
    old = runs / "segments-1a2b3c4d" / "checkpoint-5.pth"
    os.utime(old, (os.path.getmtime(old) - 3600,) * 2)
    return repo, runs / "four_channels-5e6f7a8b" / "checkpoint-11.pth"


def test_notebook_with_its_defaults_runs_after_make_demo(pretrained, toy_root, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    from test_notebook import figures, printed
    repo, newest = demo_checkout(tmp_path, toy_root, pretrained["four_channels"])
    for key in ("SEGMAE_REPO", "SEGMAE_CHECKPOINT", "SEGMAE_MODEL", "SEGMAE_DATA_PATH", "SEGMAE_IMAGE"):
        monkeypatch.delenv(key, raising=False)  # the notebook's own defaults, opened in notebooks/
    nb = nbformat.read(str(repo / "notebooks" / "visualize.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(repo / "notebooks")}}).execute()
    assert f"{newest}: four_channels, input 32x32" in printed(nb)
    assert len(figures(nb)) == 2


def test_newest_run_checkpoint_without_a_demo_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="run 'make demo' first, or set CHECKPOINT"):
        visualize.newest_run_checkpoint(str(tmp_path / "output_demo"))
