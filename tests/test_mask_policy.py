"""Every mask that trains belongs to its image: the size policy (same, resized, EXIF-rotated, else
an error), 16-bit images, duplicate stems, RLE checks in every reader, a mask cache that is never
stale, and tools/generate_masks.py with the real SAM and SAM 2 packages (random weights)."""
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_pretrain_cli import common

import main_pretrain
from conftest import REPO
from inputs.images import load_rgb
from inputs.pretrain import PretrainDataset, SegmentMaskImageFolder
from sam.cache import MaskCache, build_mask_cache
from sam.files import MaskFileError, decode_segmentation, encode_segmentation, load_annotations
from tools import check_dataset, generate_masks


def write_masks(path, masks):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    anns = [{"segmentation": encode_segmentation(m), "area": int(m.sum())} for m in masks]
    with open(path, "w") as f:
        json.dump({"annotations": anns}, f)


def scene(h, w):
    """A picture with one bright, off-centre rectangle: its mask is where the picture is bright."""
    img = np.full((h, w, 3), 40, np.uint8)
    img[h // 6: h // 2, w // 8: w // 2] = 230
    return img


def bright(img):
    return (np.asarray(img.convert("L")) > 128).astype(np.uint8)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    os.makedirs(root / "train" / "c")
    return root


def add_image(root, name, pixels, exif_orientation=None):
    img = Image.fromarray(pixels)
    path = root / "train" / "c" / name
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, exif=exif, quality=95)
    else:
        img.save(path)
    return path


def sample_mask(root, coverage=50.0, index=0):
    folder = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=coverage)
    img, mask, _ = folder[index]
    return img, mask, folder


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_mask_made_on_the_exif_rotated_picture_is_rotated_into_the_file_frame(tree, orientation):
    path = add_image(tree, "x.jpg", scene(24, 40), exif_orientation=orientation)
    displayed = ImageOps.exif_transpose(Image.open(path))  # what cv2 (SAM's amg.py) sees: 24 wide, 40 high
    assert displayed.size == (24, 40)
    write_masks(str(tree / "masks" / "c" / "x.json"), [bright(displayed)])
    img, mask, folder = sample_mask(tree)
    truth = bright(Image.open(path))  # the bright region in the pixels training uses
    assert img.size == (40, 24) and np.array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))
    assert mask.shape == (24, 40) and (mask == truth).mean() > 0.97  # JPEG edges aside
    assert folder.rotated_masks.value == 1
    report = check_dataset.check(str(tree))
    assert not report["problems"] and report["rotated"] == 1
    build_mask_cache(str(tree), folder.rel_paths, 50.0)  # the cache accepts it; training through it agrees
    img2, mask2, folder2 = sample_mask(tree)
    assert folder2.cache is not None and np.array_equal(mask2, mask)


def test_a_mask_made_on_a_downscaled_copy_is_resized_everywhere(tree):
    add_image(tree, "x.png", scene(40, 60))
    small = bright(Image.fromarray(scene(40, 60)).resize((30, 20), Image.NEAREST))
    write_masks(str(tree / "masks" / "c" / "x.json"), [small])
    _, mask, folder = sample_mask(tree)
    assert mask.shape == (40, 60) and (mask == bright(Image.fromarray(scene(40, 60)))).mean() > 0.97
    report = check_dataset.check(str(tree))
    assert not report["problems"] and report["resized"] == 1
    build_mask_cache(str(tree), folder.rel_paths, 50.0)


@pytest.mark.parametrize("mask_hw, exif", [((40, 24), None), ((30, 40), None), ((40, 24), 3)])
def test_a_mask_of_another_picture_is_an_error_everywhere(tree, mask_hw, exif):
    add_image(tree, "x.jpg", scene(24, 40), exif_orientation=exif)
    mask_path = str(tree / "masks" / "c" / "x.json")
    write_masks(mask_path, [np.ones(mask_hw, np.uint8)])
    with pytest.raises(MaskFileError) as e:
        sample_mask(tree)
    message = str(e.value)
    assert mask_path in message and f"the mask is {mask_hw[1]}x{mask_hw[0]} but its image is 40x24" in message
    assert check_dataset.check(str(tree))["problems"]
    with pytest.raises(MaskFileError, match="but its image is 40x24"):
        build_mask_cache(str(tree), ["c/x.jpg"], 50.0)
    # --skip_bad_samples: skipped and counted, never used
    dataset = PretrainDataset([SegmentMaskImageFolder(str(tree), with_masks=True)], transform=None,
                              skip_bad_samples=True)
    assert "but its image is 40x24" in dataset[0].message


def test_sixteen_bit_png_is_scaled_not_whitened(tree, tmp_path):
    values = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (32, 48, 3) and rgb.min() == 0 and rgb.max() == 255
    assert np.abs(rgb[..., 0].astype(int) - np.round(values / 257.0)).max() <= 1
    # mask generation reads it the same way
    seen = {}

    def backend(img):
        seen["img"] = img
        return []

    os.makedirs(tree / "train" / "c", exist_ok=True)
    Image.fromarray(values).save(tree / "train" / "c" / "deep.png")
    generate_masks.process_one(("c/deep.png", str(tree / "train"), str(tree / "masks"), 0, 0, 0), backend)
    assert np.array_equal(seen["img"], rgb)


def test_two_images_with_one_stem_are_refused_everywhere(tree):
    add_image(tree, "x.png", scene(24, 40))
    add_image(tree, "x.jpg", scene(24, 40))
    write_masks(str(tree / "masks" / "c" / "x.json"), [np.ones((24, 40), np.uint8)])
    with pytest.raises(MaskFileError, match=r"c/x.jpg and .*c/x.png"):
        SegmentMaskImageFolder(str(tree), with_masks=True)
    assert any("share the mask file c/x.json" in p for p in check_dataset.check(str(tree))["problems"])
    with pytest.raises(SystemExit, match="would share one mask file"):
        generate_masks.generate(str(tree), generate_masks.superpixel_backend)


@pytest.mark.parametrize("segmentation, message", [
    ({"size": [24, 40], "counts": [10, 5]}, "add up to 15 pixels"),
    ({"size": [24, 40], "counts": "0!"}, "not part of a COCO RLE"),
    ({"size": [0, 0], "counts": ""}, "size [0, 0]"),
])
def test_invalid_rle_is_found_by_the_checker_and_the_cache_builder(tree, segmentation, message):
    add_image(tree, "x.png", scene(24, 40))
    mask_path = tree / "masks" / "c" / "x.json"
    os.makedirs(mask_path.parent)
    mask_path.write_text(json.dumps({"annotations": [{"segmentation": segmentation, "area": 10}]}))
    problems = check_dataset.check(str(tree))["problems"]
    assert len(problems) == 1 and str(mask_path) in problems[0] and message in problems[0]
    with pytest.raises(MaskFileError, match=str(mask_path)):
        build_mask_cache(str(tree), ["c/x.png"], 50.0)


def test_short_rle_never_decodes_to_garbage(tree):
    """pycocotools fills a too-short RLE with uninitialised memory; every reader refuses it."""
    add_image(tree, "x.png", scene(24, 40))
    write_masks(str(tree / "masks" / "c" / "x.json"), [np.ones((24, 40), np.uint8)])
    path = tree / "masks" / "c" / "x.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"]["counts"] = [0, 900]  # 900 of 960 pixels
    path.write_text(json.dumps(data))
    with pytest.raises(MaskFileError, match="add up to 900 pixels, but its size 24x40 has 960"):
        sample_mask(tree)


def test_empty_mask_files_are_counted_not_failed(tree):
    add_image(tree, "x.png", scene(24, 40))
    os.makedirs(tree / "masks" / "c")
    (tree / "masks" / "c" / "x.json").write_text(json.dumps({"annotations": []}))
    report = check_dataset.check(str(tree))
    assert not report["problems"] and report["empty"] == 1
    _, mask, _ = sample_mask(tree)
    assert mask.shape == (24, 40) and mask.sum() == 0  # training accepts it: nothing hidden


def test_a_stale_mask_cache_is_refused_with_the_rebuild_command(toy_root, tmp_path, capsys):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    folder = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0)
    build_mask_cache(str(root), folder.rel_paths, 30.0)
    assert SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0).cache is not None
    edited = root / "masks" / folder.rel_paths[3].replace(".png", ".json")
    anns = load_annotations(str(edited))
    h, w = anns[0]["segmentation"]["size"]
    write_masks(str(edited), [np.ones((h, w), np.uint8)])  # another segment now
    argv = common(str(root), tmp_path / "o", "--mask_method", "segments", "--coverage_ratio", "30")
    with pytest.raises(SystemExit):
        main_pretrain.cli(argv)
    err = capsys.readouterr().err
    assert "older than 1 mask file(s)" in err and str(edited) in err
    assert "python tools/build_mask_cache.py --data_path" in err and "--coverage_ratio 30" in err
    build_mask_cache(str(root), folder.rel_paths, 30.0)  # rebuilt: the new segment is used
    _, mask, _ = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0)[3]
    assert mask.all()
    os.remove(edited)  # deleted after the build: stale too
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        MaskCache(str(root), 30.0)


def test_the_cache_is_checked_file_by_file_once_per_node(toy_root, tmp_path, monkeypatch):
    """Each node's first rank checks the cache against every mask file before the other ranks build
    (and stops the job when it is stale); the others do not stat the files again."""
    import shutil

    import inputs.roots
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    rels = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0).rel_paths
    build_mask_cache(str(root), rels, 30.0)
    edited = root / "masks" / rels[3].replace(".png", ".json")
    h, w = load_annotations(str(edited))[0]["segmentation"]["size"]
    write_masks(str(edited), [np.ones((h, w), np.uint8)])
    monkeypatch.setattr(inputs.roots, "first_rank_on_node", lambda: False)
    checked = []
    monkeypatch.setattr(MaskCache, "_stale_entries", staticmethod(lambda *a: checked.append(1) or []))
    assert SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0).cache is not None
    assert checked == []
    monkeypatch.undo()
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0)


def _aged_copy(toy_root, tmp_path):
    """A copy of the toy root whose mask folders are older than the build (a fresh copy's folders
    are too new to trust, and every file is checked)."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    old = time.time() - 3600
    for folder in (root / "masks").iterdir():
        os.utime(folder, (old, old))
    return root


def test_the_cache_check_stats_folders_and_a_sample_not_every_file(toy_root, tmp_path, monkeypatch):
    """Without a change, only SAMPLED_FILES mask files are stat'ed; every file of a folder that
    changed (a file replaced, deleted or added) is; an unrelated new file is not stale; an edit in
    place outside the sample is found by tools/check_dataset.py, which checks every file."""
    import sam.cache
    root = _aged_copy(toy_root, tmp_path)
    rels = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0).rel_paths
    build_mask_cache(str(root), rels, 30.0)
    with np.load(root / "masks_cache" / "coverage_30.npz") as index:
        assert (index["mask_folder_mtime_ns"] > 0).all() and len(index["key_folder"]) == len(rels)
    monkeypatch.setattr(sam.cache, "SAMPLED_FILES", 2)
    checked = []
    real = MaskCache._stale_entries

    def spy(source, keys, sizes, mtimes, rows=None):
        checked.append(sorted(keys if rows is None else [keys[i] for i in rows.tolist()]))
        return real(source, keys, sizes, mtimes, rows)

    monkeypatch.setattr(MaskCache, "_stale_entries", staticmethod(spy))
    MaskCache(str(root), 30.0)
    assert len(checked.pop()) == 2

    # a file added beside the masks of one class: that class's files are checked, none is stale
    cls = rels[3].split("/")[0]
    in_class = sorted(r for r in rels if r.startswith(cls + "/"))
    (root / "masks" / cls / "unrelated.json").write_text("[]")
    MaskCache(str(root), 30.0)
    assert set(in_class) <= set(checked.pop())

    # a mask file replaced atomically: its folder changed, so it is found whatever the sample
    edited = root / "masks" / rels[3].replace(".png", ".json")
    h, w = load_annotations(str(edited))[0]["segmentation"]["size"]
    write_masks(str(edited) + ".new", [np.ones((h, w), np.uint8)])
    os.replace(str(edited) + ".new", edited)
    monkeypatch.setattr(sam.cache, "SAMPLED_FILES", 0)
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        MaskCache(str(root), 30.0)
    build_mask_cache(str(root), rels, 30.0)
    os.remove(edited)  # deleted: stale too
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        MaskCache(str(root), 30.0)

    # an edit in place (the folder keeps its mtime) outside the sample: only the full check sees it
    root2 = _aged_copy(toy_root, tmp_path / "second")
    build_mask_cache(str(root2), rels, 30.0)
    edited = root2 / "masks" / rels[5].replace(".png", ".json")
    folder_mtime = os.stat(edited.parent).st_mtime_ns
    with open(edited, "a") as f:
        f.write(" ")
    assert os.stat(edited.parent).st_mtime_ns == folder_mtime
    MaskCache(str(root2), 30.0)
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        MaskCache(str(root2), 30.0, every_file=True)
    report = check_dataset.check(str(root2), coverage=30.0)
    assert any("older than 1 mask file" in p and str(edited) in p for p in report["problems"])


def test_a_fresh_mask_folder_makes_every_file_checked(toy_root, tmp_path, monkeypatch):
    """Folders changed within SETTLE_S of the build are recorded as untrusted (coarse clocks): an
    edit in place there is found without the sample."""
    import shutil

    import sam.cache
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    rels = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0).rel_paths
    for folder in (root / "masks").iterdir():  # copytree kept the source's (old) folder times
        os.utime(folder)
    build_mask_cache(str(root), rels, 30.0)
    with np.load(root / "masks_cache" / "coverage_30.npz") as index:
        assert (index["mask_folder_mtime_ns"] == -1).all()
    edited = root / "masks" / rels[7].replace(".png", ".json")
    with open(edited, "a") as f:
        f.write(" ")
    monkeypatch.setattr(sam.cache, "SAMPLED_FILES", 0)
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        MaskCache(str(root), 30.0)


def test_a_cache_without_build_dates_is_refused(toy_root, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    rels = SegmentMaskImageFolder(str(root), with_masks=True).rel_paths
    build_mask_cache(str(root), rels, 50.0)
    index = str(root / "masks_cache" / "coverage_50.npz")
    with np.load(index) as f:
        old = {k: f[k] for k in f.files if k not in ("mask_bytes", "mask_mtime_ns")}
    with open(index, "wb") as f:
        np.savez(f, **old)
    with pytest.raises(MaskFileError, match="records no mask file dates"):
        MaskCache(str(root), 50.0)


# ------------------------------------------------------------------------------------------------
# generate_masks.py

def test_generation_layout_settings_caps_empty_and_exit_status(tree, tmp_path):
    add_image(tree, "a.png", scene(24, 40))
    add_image(tree, "b.png", scene(24, 40))
    (tree / "train" / "c" / "broken.png").write_bytes(b"not a png")
    res = subprocess.run([sys.executable, "tools/generate_masks.py", "--data_path", str(tree), "--backend",
                          "superpixels", "--workers", "1", "--max_masks", "5"], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 1 and "broken.png" in res.stderr  # a failed image fails the run
    data = json.load(open(tree / "masks" / "c" / "a.json"))
    assert list(data) == ["image", "annotations", "generator"]
    assert list(data["image"]) == ["image_id", "width", "height", "file_name"]
    assert data["generator"]["backend"] == "superpixels"
    anns = data["annotations"]
    assert len(anns) == 5 and [a["id"] for a in anns] == sorted({a["id"] for a in anns})
    assert list(anns[0]) == ["bbox", "area", "segmentation", "id"]  # SA-1B's order, keys it has
    areas = [a["area"] for a in anns]
    assert areas == sorted(areas) and areas[0] < areas[-1]  # spread over the range of areas

    def nothing(img):
        return []

    os.remove(tree / "train" / "c" / "broken.png")
    os.remove(tree / "masks" / "c" / "b.json")
    summary = generate_masks.generate(str(tree), lambda: nothing, log_every=0)
    assert summary["empty"] == 1 and summary["generated"] == 1
    calls = []

    def counting(img):
        calls.append(1)
        return generate_masks.superpixel_segments(img)

    again = generate_masks.generate(str(tree), lambda: counting, log_every=0)
    assert not calls and again["empty"] == 1
    generate_masks.generate(str(tree), lambda: counting, log_every=0, redo_empty=True)
    assert len(calls) == 1 and load_annotations(str(tree / "masks" / "c" / "b.json"))


def test_sam_checks_its_checkpoint_before_reading_the_data(tmp_path):
    pytest.importorskip("segment_anything")
    with pytest.raises(SystemExit, match="--sam_checkpoint .*missing.pth.* not found"):
        generate_masks.main(["--data_path", str(tmp_path / "nowhere"), "--backend", "sam", "--sam_checkpoint",
                             str(tmp_path / "missing.pth")])
    import torch
    torch.save({"image_encoder.unrelated": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="does not fit --sam_model vit_b"):
        generate_masks.main(["--data_path", str(tmp_path / "nowhere"), "--backend", "sam", "--sam_checkpoint",
                             str(tmp_path / "other.pth"), "--sam_model", "vit_b"])


@pytest.mark.slow
@pytest.mark.parametrize("backend, model, n", [("sam2", "hiera_tiny", 2), ("sam", "vit_b", 1)])  # ViT-B at 1024 px: ~15 s per image on CPU
def test_real_sam_packages_write_files_that_train(tree, tmp_path, capsys, backend, model, n):
    pytest.importorskip("sam2" if backend == "sam2" else "segment_anything")
    for i in range(n):
        add_image(tree, f"x{i}.png", scene(24, 40))
    summary = generate_masks.main(["--data_path", str(tree), "--backend", backend, "--sam_model", model,
                                   "--random_sam_weights", "--points_per_side", "4", "--points_per_batch", "16", "--pred_iou_thresh", "0",
                                   "--stability_score_thresh", "0"])
    assert "on cpu" in capsys.readouterr().out  # says where SAM runs
    assert summary["generated"] == n and not summary["failed"]
    data = json.load(open(tree / "masks" / "c" / "x0.json"))
    assert data["generator"]["backend"] == backend and data["generator"]["model"] == model
    assert data["generator"]["checkpoint"] == "random-weights"  # such files say what made them
    assert data["generator"]["points_per_side"] == 4 and data["generator"]["box_nms_thresh"] == 0.7
    for a in data["annotations"]:
        assert list(a)[:3] == ["bbox", "area", "segmentation"]
        assert decode_segmentation(a["segmentation"]).sum() == a["area"]
    assert not check_dataset.check(str(tree))["problems"]
    out = tmp_path / "o"
    main_pretrain.cli(common(str(tree), out, "--mask_method", "segments", "--allow_missing_masks",
                             "--batch_size", str(min(n, 8))))  # one batch of the images with masks
    assert (out / "checkpoint-0.pth").exists()
    assert glob.glob(str(tree / "masks" / "c" / "*.json"))
