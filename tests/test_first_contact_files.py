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
from PIL import Image, ImageOps
from test_export import features_of_ours
from test_faults_data2 import ORIENTED, bright_segmenter, oriented_photos
from test_mask_layouts import rect, segmae_root
from test_pretrain_cli import common
from timm.data.constants import IMAGENET_DEFAULT_MEAN

import main_pretrain
import models_mae
from conftest import REPO
from evals.visualize import FRAME_COLOUR, labelled_grid, legible_text, panel_titles
from run.checkpoint import atomic_torch_save, load_checkpoint, saved_args
from sam.geometry import exif_orientation
from sam.layouts import describe_generator
from tools import check_dataset, convert_masks, export, generate_masks, visualize
from util.misc import UserError

WEIRD = "data $(touch pwned) it's"
CJK = "0 猫の写真"  # sorts first in its class


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


@pytest.mark.slow
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
    toy = repo / "data" / "toy"  # its first image gets a CJK name (a phone's, a Chinese photographer's)
    os.rename(toy / "train" / "boxes" / "boxes_train_0000.png", toy / "train" / "boxes" / f"{CJK}.png")
    os.rename(toy / "masks" / "boxes" / "boxes_train_0000.json", toy / "masks" / "boxes" / f"{CJK}.json")
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
    assert "missing from font" not in printed(nb)  # the CJK file name is drawn escaped, not as boxes


def test_newest_run_checkpoint_without_a_demo_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="run 'make demo' first, or set CHECKPOINT"):
        visualize.newest_run_checkpoint(str(tmp_path / "output_demo"))


# ---- pictures and titles -------------------------------------------------------------------------------------

def test_masks_converted_from_segmae_are_titled_sam(tmp_path, pretrained):
    m = rect(32, 32, 0, 16, 0, 16)
    root = segmae_root(tmp_path, {"a.png": (32, 32)}, {"a.png": [(25.0, m)]})
    convert_masks.main(["--data_path", str(root), "--workers", "1"])
    os.rename(root / "masks", root / "masks_segmae")
    os.rename(root / "masks_json", root / "masks")
    image = str(root / "train" / "c" / "a.png")
    model, size, normalization = visualize.load_mae(pretrained["segments"])
    _, segment, generator = visualize.image_and_segment(image, size, normalization,
                                                        visualize.open_segments(str(root), [image]), str(root),
                                                        model.method)
    assert generator == "SAM (segmae layout)" and segment is not None
    titles = panel_titles(model.method, generator, 50.0)
    assert titles[2] == "white: visible, black: SAM (segmae layout) segment (closest to 50%)"
    # a JSON file whose generator entry records no backend at all: SAM's, as one without the entry
    assert describe_generator({"model": ""}) == "SAM" and describe_generator(None) == "SAM"


def test_cjk_names_are_escaped_for_the_font():
    assert legible_text(f"{CJK}.png") == "0 \\u732b\\u306e\\u5199\\u771f.png"
    assert legible_text("café.png") == "café.png"  # what the font has stays as it is


def test_every_panel_has_a_frame_white_on_white_shows():
    panels = torch.ones(1, 3, 3, 8, 8)  # white panels, as the visibility of a method that hides nothing
    grid = np.asarray(labelled_grid(panels, ["original", "encoder input", "white: visible"], ["x"], min_panel=32))
    grey = np.all(grid == FRAME_COLOUR, axis=-1)
    for j in range(3):  # each panel (32x32, 4 px apart, the last row at the bottom): a grey outline around it
        x0, y0 = grid.shape[1] - (3 - j) * (32 + 4), grid.shape[0] - (32 + 4)
        assert (grid[y0:y0 + 32, x0:x0 + 32] == 255).all()
        assert grey[y0 - 1, x0 - 1:x0 + 33].all() and grey[y0 + 32, x0 - 1:x0 + 33].all()
        assert grey[y0 - 1:y0 + 33, x0 - 1].all() and grey[y0 - 1:y0 + 33, x0 + 32].all()


def test_visualize_num_spreads_over_the_classes(toy_root, tmp_path):
    written = visualize.main(["--data_path", toy_root, "--num", "6", "--mask_method", "patches", "--input_size",
                              "32", "--patch_size", "8", "--out", str(tmp_path)])
    names = [os.path.basename(p) for p in written]
    assert names == ["boxes_train_0000_patches_mask.png", "discs_train_0000_patches_mask.png",
                     "stripes_train_0000_patches_mask.png", "triangles_train_0000_patches_mask.png",
                     "boxes_train_0001_patches_mask.png", "discs_train_0001_patches_mask.png"]


# ---- EXIF-oriented photos: counted, said what it means, and how to train them upright ------------------------

def oriented_root(tmp_path):
    """train/c/ with the sixteen photos of every orientation (14 other than 1), masks by this repo's generator."""
    root = tmp_path / "photos"
    oriented_photos(root)
    assert generate_masks.generate(str(root), lambda: bright_segmenter, log_every=0,
                                   settings={"backend": "sam", "model": "vit_b"})["generated"] == len(ORIENTED)
    return root


def test_check_dataset_counts_exif_oriented_photos_and_its_command_bakes_them_upright(tmp_path, capsys):
    root = oriented_root(tmp_path)
    stored = {p.name: Image.open(p) for p in (root / "train" / "c").iterdir()}
    displayed = {name: np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.float32) for name, im in stored.items()}
    assert check_dataset.main(["--data_path", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "14 images have an EXIF orientation other than 1" in out
    assert "training uses their stored pixels, as the reference MAE does" in out and "regenerate their masks" in out
    [command] = ["-c " + line.split("python -c ", 1)[1] for line in out.splitlines() if "python -c " in line]
    subprocess.run(["bash", "-c", f"{sys.executable} {command}"], check=True)
    for name, pixels in displayed.items():  # every photo now stored upright, its tag gone
        with Image.open(root / "train" / "c" / name) as im:
            assert exif_orientation(im) == 1
            assert np.abs(np.asarray(im.convert("RGB"), np.float32) - pixels).mean() < 3, name
    check_dataset.main(["--data_path", str(root), "--workers", "1"])
    assert "EXIF orientation other than 1" not in capsys.readouterr().out


def test_pretraining_counts_exif_oriented_photos_in_its_first_epoch(tmp_path, capsys):
    root = oriented_root(tmp_path)
    out = tmp_path / "out"
    for method in ("patches", "segments"):
        main_pretrain.cli(common(str(root), out / method, "--mask_method", method, "--batch_size", "16",
                                 "--epochs", "2", "--warmup_epochs", "0"))
        text = capsys.readouterr().out
        assert text.count("NOTE: 14 image(s) read in this epoch have an EXIF orientation other than 1") == 1, method
        assert "training uses their stored pixels, as the reference MAE does" in text
    # segment methods open a sample of the images at start-up (the mask size check): said there too
    assert "14 of the 16 images opened for the mask size check have an EXIF orientation other than 1" in text
