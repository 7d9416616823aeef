"""What a new user meets first, on real-world input: no silent random SAM, masks of another
generator redone, the class count taken from the data, clear one-line errors, honest help."""
import json
import os

import numpy as np
import pytest
from test_mask_policy import add_image, scene, tree  # noqa: F401 - the fixture

from tools import generate_masks

# ------------------------------------------------------------------------------------------------
# generate_masks.py

@pytest.mark.parametrize("backend", ["sam", "sam2"])
def test_sam_without_weights_is_refused_before_anything_runs(tmp_path, capsys, backend):
    with pytest.raises(SystemExit, match=f"--backend {backend} needs --sam_checkpoint: without weights SAM finds "
                                         f"nothing.*--random_sam_weights"):
        generate_masks.main(["--data_path", str(tmp_path / "nowhere"), "--backend", backend])


def test_a_truncated_official_sam_file_is_named(tmp_path):
    pytest.importorskip("segment_anything")
    bad = tmp_path / "sam_vit_b_01ec64.pth"
    bad.write_bytes(b"half a download")
    with pytest.raises(SystemExit, match="its MD5 does not start with 01ec64.*download it again"):
        generate_masks.main(["--data_path", str(tmp_path), "--backend", "sam", "--sam_model", "vit_b",
                             "--sam_checkpoint", str(bad)])


def test_files_of_another_generator_are_made_again(tree, capsys):  # noqa: F811
    for i in range(3):
        add_image(tree, f"x{i}.png", scene(24, 40))
    first = generate_masks.generate(str(tree), generate_masks.superpixel_backend, log_every=0)
    assert first["generated"] == 3
    recorded = json.load(open(tree / "masks" / "c" / "x0.json"))["generator"]
    assert recorded == generate_masks.superpixel_backend.settings
    calls = []

    def sam_like(img):
        calls.append(1)
        return generate_masks.superpixel_segments(img)

    sam = {"backend": "sam", "model": "vit_b", "checkpoint": "sam_vit_b_01ec64.pth"}
    kept = generate_masks.generate(str(tree), lambda: sam_like, log_every=0, settings=sam,
                                   keep_other_generators=True)
    assert not calls and kept["other_generator"] == 3
    assert "3 mask file(s) were made by another generator or other settings than this run's (sam vit_b): kept" \
        in capsys.readouterr().out
    redone = generate_masks.generate(str(tree), lambda: sam_like, log_every=0, settings=sam)
    assert len(calls) == 3 and redone["generated"] == 3
    assert "made again (--keep_other_generators keeps them)" in capsys.readouterr().out
    assert json.load(open(tree / "masks" / "c" / "x0.json"))["generator"] == sam
    again = generate_masks.generate(str(tree), lambda: sam_like, log_every=0, settings=sam)
    assert len(calls) == 3 and again["skipped_existing"] == 3 and again["other_generator"] == 0
    # other settings of the same backend are another generator too; caps are recorded when set
    capped = generate_masks.generate(str(tree), lambda: sam_like, log_every=0, settings=sam, max_masks=2)
    assert capped["generated"] == 3
    assert json.load(open(tree / "masks" / "c" / "x0.json"))["generator"] == {**sam, "max_masks": 2}


def test_sam_settings_record_what_made_the_file():
    s = generate_masks.sam_settings("sam", "/w/sam_vit_b_01ec64.pth", "vit_b", points_per_side=8)
    assert s["checkpoint"] == "sam_vit_b_01ec64.pth" and s["points_per_side"] == 8 and s["box_nms_thresh"] == 0.7
    assert generate_masks.sam_settings("sam", "", "vit_b")["checkpoint"] == "random-weights"


def test_every_generator_flag_has_its_own_help_and_default(capsys):
    with pytest.raises(SystemExit):
        generate_masks.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, default in generate_masks.GENERATOR_DEFAULTS.items():
        assert f"{generate_masks.GENERATOR_HELP[name]} (default: {default}, SAM's)" in out, name
    assert "--split SPLIT the folder under --data_path to make masks for (default: train)" in out
    assert len(set(generate_masks.GENERATOR_HELP.values())) == len(generate_masks.GENERATOR_DEFAULTS)


def test_the_docstring_shows_its_commands_as_written(capsys):
    with pytest.raises(SystemExit):
        generate_masks.main(["--help"])
    assert "--backend sam \\\n" in capsys.readouterr().out




# ------------------------------------------------------------------------------------------------
# the class count

def finetune_flags(toy_root, out, *extra):
    return ["--data_path", toy_root, "--model", "vit_tiny_patch8", "--input_size", "32", "--batch_size", "8",
            "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
            "--output_dir", str(out), "--log_dir", str(out), *extra]


def test_the_class_count_comes_from_the_data_when_not_given(toy_root, pretrained, tmp_path, capsys):
    import torch

    import main_finetune
    import main_linprobe
    main_finetune.cli(finetune_flags(toy_root, tmp_path / "ft", "--finetune", pretrained["patches"]))
    assert "--nb_classes 4: the class folders in" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "ft" / "checkpoint-0.pth", weights_only=False)
    assert ckpt["model"]["head.weight"].shape[0] == 4 and ckpt["args"].nb_classes == 4
    main_linprobe.cli(finetune_flags(toy_root, tmp_path / "lp", "--finetune", pretrained["patches"]))
    ckpt = torch.load(tmp_path / "lp" / "checkpoint-0.pth", weights_only=False)
    assert ckpt["model"]["head.1.weight"].shape[0] == 4


def test_a_given_class_count_that_disagrees(toy_root, pretrained, tmp_path, capsys):
    import main_finetune
    with pytest.raises(SystemExit):
        main_finetune.cli(finetune_flags(toy_root, tmp_path / "a", "--nb_classes", "2"))
    assert "has 4 classes but --nb_classes is 2: pass --nb_classes 4 (or leave it out)" in capsys.readouterr().err
    main_finetune.cli(finetune_flags(toy_root, tmp_path / "b", "--nb_classes", "10", "--finetune",
                                     pretrained["patches"]))
    assert "WARNING: --nb_classes 10 but" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# an RLE that claims a huge size is refused before anything is decoded, in every reader

def test_an_rle_claiming_a_huge_size_is_refused_before_decoding(tree, monkeypatch):  # noqa: F811
    from test_mask_policy import sample_mask

    import sam.files
    import sam.layouts
    from sam.cache import build_mask_cache
    from sam.files import MaskFileError
    from tools import check_dataset
    add_image(tree, "x.png", scene(24, 40))
    mask_path = tree / "masks" / "c" / "x.json"
    os.makedirs(mask_path.parent)
    huge = {"size": [100000, 100000], "counts": [100000 * 100000]}  # a valid RLE: one run of 10^10 zeros
    mask_path.write_text(json.dumps({"annotations": [{"segmentation": huge, "area": 5 * 10 ** 9}]}))

    def no_decoding(*a, **k):
        raise AssertionError("decoded a mask that should have been refused")

    monkeypatch.setattr(sam.files, "decode_segmentation", no_decoding)
    monkeypatch.setattr(sam.layouts, "decode_segmentation", no_decoding)
    message = "the mask claims 100000x100000 pixels but its image is 40x24: not a mask of this picture"
    with pytest.raises(MaskFileError, match=message) as e:
        sample_mask(tree)
    assert str(mask_path) in str(e.value)
    problems = check_dataset.check(str(tree))["problems"]
    assert any(message in p for p in problems), problems
    with pytest.raises(MaskFileError, match=message):
        build_mask_cache(str(tree), ["c/x.png"], 50.0)


# ------------------------------------------------------------------------------------------------
# an image over Pillow's decompression-bomb limit

def test_an_image_over_pillows_limit_is_named_with_the_fix_and_skipped_on_request(tree, monkeypatch):  # noqa: F811
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO
    from inputs.images import DataError, load_rgb
    from inputs.pretrain import PretrainDataset, SegmentMaskImageFolder
    from sam.cache import build_mask_cache
    from sam.files import MaskFileError
    path = add_image(tree, "big.png", scene(60, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as a 20000x20000 photo against the default
    fix = "shrink the file, or raise the limit with PIL_MAX_IMAGE_PIXELS=<pixels> in the environment"
    with pytest.raises(DataError, match=f"image {path} is larger than Pillow allows .*{fix}"):
        load_rgb(str(path))
    with pytest.raises(DataError, match=fix):
        SegmentMaskImageFolder(str(tree), with_masks=False)[0]
    skipping = PretrainDataset([SegmentMaskImageFolder(str(tree), with_masks=False)], transform=None, skip_bad_samples=True)
    assert fix in skipping[0].message
    write = tree / "masks" / "c" / "big.json"
    os.makedirs(write.parent)
    from sam.files import encode_segmentation
    write.write_text(json.dumps({"annotations": [{"segmentation": encode_segmentation(np.ones((60, 60), np.uint8)),
                                                  "area": 3600}]}))
    with pytest.raises(MaskFileError, match=fix):
        build_mask_cache(str(tree), ["c/big.png"], 50.0)
    out = subprocess.run([sys.executable, "-c", "import inputs.images, PIL.Image; print(PIL.Image.MAX_IMAGE_PIXELS)"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PIL_MAX_IMAGE_PIXELS": "0"})
    assert out.stdout.strip() == "None"


def test_no_mask_at_all_says_so_even_with_allow_missing_masks(toy_root, tmp_path):
    import shutil

    from inputs.images import DataError
    from inputs.pretrain import SegmentMaskImageFolder
    root = tmp_path / "nomasks"
    shutil.copytree(os.path.join(toy_root, "train"), root / "train")
    os.makedirs(root / "masks" / "boxes")  # a masks/ folder, but nothing in it
    with pytest.raises(DataError, match=r"no image under .*train has a mask file: looked in .*masks for SAM JSON "
                                        r"\(<class>/<stem>.json\), the original segmae layout .*amg.py folders"):
        SegmentMaskImageFolder(str(root), with_masks=True, allow_missing_masks=True)


def test_a_typo_in_stage_flags_is_named_once(toy_root, toy_ade20k, tmp_path, capsys):
    import benchmark
    with pytest.raises(SystemExit):
        benchmark.cli(["--in1k-dir", toy_root, "--ade20k-dir", toy_ade20k, "--output-dir", str(tmp_path / "b"),
                       "--pretrain-args", "--batchsize 3"])
    err = capsys.readouterr().err
    assert "--pretrain-args '--batchsize 3': unrecognized arguments: --batchsize 3\n" in err


# ------------------------------------------------------------------------------------------------
# defaults and what is printed

def test_tensorboard_goes_beside_the_run_when_only_output_dir_is_given(tmp_path):
    import main_pretrain
    from run.setup import run_cli
    args = run_cli(main_pretrain.get_args_parser(), lambda a, p: None, lambda a: a,
                   ["--output_dir", str(tmp_path / "run")])
    assert args.log_dir == str(tmp_path / "run")
    args = run_cli(main_pretrain.get_args_parser(), lambda a, p: None, lambda a: a,
                   ["--output_dir", str(tmp_path / "run"), "--log_dir", str(tmp_path / "tb")])
    assert args.log_dir == str(tmp_path / "tb")


def test_benchmark_and_knn_help_show_defaults(capsys):
    import benchmark
    import evals.knn
    for parser, flags in ((benchmark.get_args_parser(), ("--output-dir", "--pretrain-epochs", "--seg-epochs",
                                                         "--mask-method", "--crop-size")),
                          (evals.knn.get_args_parser(), ("--k", "--temperature", "--batch_size", "--num_workers"))):
        text = " ".join(parser.format_help().split())
        for flag in flags:
            action = next(a for a in parser._actions if flag in a.option_strings)
            assert "default" in (action.help or ""), flag
        assert "(default: %(default)s)" not in text


def test_knn_loader_workers_fit_the_machine(monkeypatch):
    import importlib

    import evals.knn
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert importlib.reload(evals.knn).get_args_parser().parse_args(["--checkpoint", "c", "--data_path", "d"]) \
        .num_workers == 2


def test_without_an_output_folder_the_arguments_are_one_line(capsys):
    import argparse

    from run.setup import log_details
    args = argparse.Namespace(output_dir="", checkpoint="c.pth", k=20, given_flags=["checkpoint"])
    log_details(args, "args.txt", str(args).replace(", ", ",\n"), "all arguments")
    out = capsys.readouterr().out
    assert out.endswith("all arguments not written (no output folder); given: --checkpoint c.pth\n")
    assert out.count("\n") == 1


def test_slurm_jobs_run_this_interpreter(monkeypatch, capsys, toy_root, tmp_path):
    import shlex
    import sys

    import submitit

    import submitit_pretrain
    submitit_pretrain.main(["--dry_run", "--job_dir", str(tmp_path / "%j"), "--data_path", toy_root,
                            "--model", "mae_vit_tiny_patch8", "--input_size", "32"])
    script = capsys.readouterr().out
    assert f"{shlex.quote(sys.executable)} -u -m submitit.core._submit" in script
    assert "\npython -m" not in script and " python -m" not in script
    seen = {}

    class Recording:
        cluster = "slurm"

        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("recorded")  # stop before anything is submitted

    monkeypatch.setattr(submitit, "AutoExecutor", Recording)
    with pytest.raises(RuntimeError, match="recorded"):
        submitit_pretrain.main(["--job_dir", str(tmp_path / "%j"), "--data_path", toy_root,
                                "--model", "mae_vit_tiny_patch8", "--input_size", "32"])
    assert seen["slurm_python"] == shlex.quote(sys.executable)


def test_make_reinstalls_from_the_content_of_requirements_not_its_time(tmp_path):
    import shutil
    import subprocess
    import sys
    import time

    from conftest import REPO
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")

    def plan():
        return subprocess.run(["make", "-n", "venv", f"PYTHON={sys.executable}"], cwd=tmp_path, capture_output=True,
                              text=True, check=True).stdout

    first = plan()
    assert "pip install" in first
    stamp = next(line.split()[-1] for line in first.splitlines() if line.startswith("touch "))
    (tmp_path / stamp).touch()  # as after an install
    time.sleep(0.01)
    os.utime(tmp_path / "requirements.txt")  # a fresh clone: newer file times, same content
    assert "pip install" not in plan()
    with open(tmp_path / "requirements.txt", "a") as f:
        f.write("einops>=0.7\n")
    assert "pip install" in plan()


def test_runs_that_differ_by_one_flag_are_labelled_by_that_flag():
    from evals.report import curve_labels

    def row(run_id, pretrain_args, seg_args=()):
        return {"run_id": f"patches-vit_base_patch16-seed0-{run_id}", "eval_id": "e", "method": "patches",
                "coverage_ratio": None, "epochs": 100, "mIoU": 1.0, "pixel_accuracy": 1.0,
                "model": "mae_vit_base_patch16", "stack": "",
                "config": {"seed": 0, "pretrain_epochs": 800, "pretrain_args": list(pretrain_args),
                           "seg_args": list(seg_args)}}
    rows = [row("08fbf5", ["--blr", "1.5e-4", "--norm_pix_loss"]), row("7dc42e", ["--blr", "1e-3", "--norm_pix_loss"]),
            row("aaaaaa", ["--blr=1e-3"])]
    labels = sorted(curve_labels(rows).values())
    assert labels == ["patches, --blr 1.5e-4 --norm_pix_loss on", "patches, --blr 1e-3 --norm_pix_loss -",
                      "patches, --blr 1e-3 --norm_pix_loss on"]
    assert not any("08fbf5" in x or "7dc42e" in x for x in labels)


# ------------------------------------------------------------------------------------------------
# masks of the wrong size: found at start-up; an error in a loader worker is one line

def test_a_mask_of_the_wrong_size_is_found_at_start_up(tree, capsys):  # noqa: F811
    from test_mask_policy import write_masks

    from inputs.pretrain import build_pretrain_dataset
    from sam.files import MaskFileError
    for i in range(4):
        add_image(tree, f"x{i}.png", scene(24, 40))
        write_masks(str(tree / "masks" / "c" / f"x{i}.json"), [np.ones((24, 40), np.uint8)])
    write_masks(str(tree / "masks" / "c" / "x2.json"), [np.ones((30, 40), np.uint8)])
    with pytest.raises(MaskFileError, match=r"1 of 4 images checked at start-up have a mask that does not fit, "
                                            r"e.g. .*x2.json: the mask is 40x30 but its image is 40x24"):
        build_pretrain_dataset(str(tree), None, with_masks=True)
    build_pretrain_dataset(str(tree), None, with_masks=True, mask_size_check=2)  # x0 and x3 sampled: no error
    build_pretrain_dataset(str(tree), None, with_masks=True, skip_bad_samples=True)
    assert "WARNING: 1 of 4 images checked at start-up" in capsys.readouterr().out
    with pytest.raises(MaskFileError):
        build_pretrain_dataset(str(tree), None, with_masks=True, mask_size_check=0)  # 0: every image


def test_an_error_in_a_loader_worker_is_one_line(capsys):
    import argparse

    import torch

    from run.setup import run_cli
    from sam.files import MaskFileError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise MaskFileError("/data/masks/c/x2.json: the mask is 40x30 but its image is 40x24")

    def main(args):
        for _ in torch.utils.data.DataLoader(Broken(), num_workers=1):
            pass

    with pytest.raises(SystemExit):
        run_cli(argparse.ArgumentParser(), lambda a, p: None, main, [])
    err = capsys.readouterr().err
    assert err == ("ERROR: /data/masks/c/x2.json: the mask is 40x30 but its image is 40x24 "
                   "(in a data loader worker)\n")


def test_visualize_shows_the_images_asked_for(pretrained, toy_root, tmp_path):
    import glob

    from tools import visualize
    train = sorted(glob.glob(os.path.join(toy_root, "train", "*", "*")))[:3]
    written = visualize.main(["--checkpoint", pretrained["segments"], "--data_path", toy_root, "--images", *train,
                              "--num", "1", "--out", str(tmp_path / "a")])
    assert sorted(os.path.basename(w).split("_segments")[0] for w in written) == \
        sorted(os.path.splitext(os.path.basename(p))[0] for p in train)  # all three, and nothing else
    written = visualize.main(["--checkpoint", pretrained["patches"], "--data_path", toy_root, "--num", "2",
                              "--out", str(tmp_path / "b")])
    assert len(written) == 2


def test_visualize_names_the_generator_and_what_black_and_white_mean(tmp_path):
    from evals.visualize import panel_titles
    from sam.layouts import describe_generator
    assert describe_generator({"backend": "sam2", "model": "hiera_large"}) == "SAM 2 hiera_large"
    assert describe_generator({"backend": "sam", "model": "vit_b", "checkpoint": "random-weights"}) == \
        "SAM vit_b (random weights)"
    assert describe_generator(generate_masks.superpixel_backend.settings) == "superpixels"
    assert describe_generator(None) == "SAM"  # SA-1B files and SAM's own script record nothing
    titles = panel_titles("segments", "SAM 2 hiera_large", 40)
    assert titles[2] == "white: visible, black: SAM 2 hiera_large segment (closest to 40%)"
    assert panel_titles("patches")[2] == "white: visible, black: dropped patches"


def test_visualize_mask_preview_without_a_checkpoint(tree, tmp_path):  # noqa: F811
    import torch

    from evals.visualize import mask_panels
    from tools import visualize
    img = add_image(tree, "x.png", scene(32, 32))
    generate_masks.generate(str(tree), generate_masks.superpixel_backend, log_every=0)
    written = visualize.main(["--data_path", str(tree), "--images", str(img), "--input_size", "32",
                              "--coverage_ratio", "30", "--out", str(tmp_path / "v")])
    assert [os.path.basename(w) for w in written] == ["x_segments_mask.png"]
    # the segment method: the third panel is 1 - the chosen segment, the second greys it
    seg = (torch.rand(1, 1, 32, 32) > 0.5).float()
    imgs = torch.randn(1, 3, 32, 32)
    panels = mask_panels("segments", imgs, seg)
    assert panels.shape == (1, 3, 3, 32, 32)
    assert torch.equal(panels[0, 2], (1 - seg[0]).expand(3, -1, -1))
    assert torch.allclose(panels[0, 1][:, seg[0, 0] > 0], torch.tensor(0.5))
    # patches: exactly --mask_ratio of the patches, whole patches
    torch.manual_seed(0)
    hidden = 1 - mask_panels("patches", imgs, mask_ratio=0.75, patch_size=8)[0, 2, 0]
    per_patch = hidden.reshape(4, 8, 4, 8).permute(0, 2, 1, 3).reshape(16, 64)
    assert set(per_patch.mean(1).tolist()) == {0.0, 1.0} and per_patch.mean() == 0.75
    with pytest.raises(SystemExit, match="--mask_method is read from --checkpoint"):
        visualize.main(["--checkpoint", str(tmp_path / "c.pth"), "--mask_method", "patches", "--images", str(img)])


def test_visualize_draws_non_ascii_names_legibly():
    from evals.visualize import _unicode_font, labelled_grid, legible
    assert legible("caf\u00e9_\u732b.png") == "caf\\xe9_\\u732b.png"  # no font: escapes, never boxes
    found = _unicode_font()
    if found is not None:
        has = lambda c: found[1].get_char_index(ord(c)) != 0  # noqa: E731
        assert legible("caf\u00e9_\u0416_\u732b.png", has) == "caf\u00e9_\u0416_\\u732b.png"
    import torch
    width = lambda label: labelled_grid(torch.zeros(1, 1, 3, 8, 8), ["t"], [label]).size[0]  # noqa: E731
    assert width("\u732b.png") == width("\\u732b.png") > width("x.png")  # drawn as its escape
