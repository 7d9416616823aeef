"""First contact with files, exports and pictures: the tools say what they do with what a user
brings (docs/RELIABILITY.md, "First contact: files, exports and pictures")."""
import argparse
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

from conftest import REPO
from run.checkpoint import atomic_torch_save, load_checkpoint, saved_args
from tools import convert_masks, export

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
