"""ImageNet scale: per-image metadata in arrays that forked workers share, and the saved scan that
spares a restart the walk of the tree."""
import gc
import os
import shutil
import types

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

import util.image_folders as image_folders
from util import scan_index
from util.datasets import SegmentMaskImageFolder
from util.finetune_data import CheckedImageFolder
from util.image_folders import scan_image_folder
from util.images import ImageList

OLD = 1_500_000_000  # a date (2017) long before any test runs: the tree has settled
NO_SAVED_SCANS = shutil.ignore_patterns(".segmae_scan-*")  # the shared toy tree's own, from other tests


def settled_copy(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root, ignore=NO_SAVED_SCANS)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (OLD, OLD))
        os.utime(dirpath, (OLD, OLD))
    return root


def test_an_image_list_is_torchvisions_samples(toy_root):
    reference = ImageFolder(os.path.join(toy_root, "train"))
    scan = scan_image_folder(os.path.join(toy_root, "train"), use_index=False)
    assert list(scan.samples) == reference.samples and scan.targets == reference.targets
    assert scan.samples[-1] == reference.samples[-1] and scan.samples[5] == reference.samples[5]
    picked = scan.samples.select([7, 2])
    assert list(picked) == [reference.samples[7], reference.samples[2]]
    odd = ImageList("/r", ["ü/ä b.png", "x"], [3, 1])
    assert odd.rels() == ["ü/ä b.png", "x"] and odd[0] == ("/r/ü/ä b.png", 3) and len(ImageList("/r", [], [])) == 0
    with pytest.raises(IndexError):
        odd.rel(2)


def per_image_objects(obj, n: int) -> list:
    """Containers of at least n items reachable from obj (what a worker would copy page by page)."""
    found, seen, stack = [], set(), [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen or isinstance(x, (type, np.ndarray, str, bytes, types.ModuleType, types.FunctionType,
                                           types.MethodType, types.BuiltinFunctionType)):
            continue
        seen.add(id(x))
        if isinstance(x, (list, tuple, dict, set)) and len(x) >= n:
            found.append(type(x).__name__)
        stack.extend(gc.get_referents(x))
    return found


def test_datasets_hold_no_per_image_python_objects(toy_root):
    n = len(scan_image_folder(os.path.join(toy_root, "train")).samples)
    for with_masks in (False, True):
        folder = SegmentMaskImageFolder(toy_root, with_masks=with_masks)
        assert len(folder) == n and per_image_objects(folder, n) == []
    finetune = CheckedImageFolder(os.path.join(toy_root, "train"), transform=None)
    assert len(finetune) == n and per_image_objects(finetune, n) == []
    reference = ImageFolder(os.path.join(toy_root, "train"))  # what the check finds in torchvision's
    assert per_image_objects(reference, n) == ["list", "list"]  # samples (also its imgs) and targets


def test_a_restart_reads_the_saved_scan_and_notices_every_change(toy_root, tmp_path, monkeypatch):
    root = settled_copy(toy_root, tmp_path)
    train = str(root / "train")
    first = scan_image_folder(train)
    assert os.path.isfile(root / ".segmae_scan-train.npz")
    walked = []
    real_walk = os.walk
    monkeypatch.setattr(image_folders.os, "walk", lambda *a, **k: walked.append(a) or real_walk(*a, **k))
    again = scan_image_folder(train)
    assert walked == [] and list(again.samples) == list(first.samples) and again.classes == first.classes
    val = scan_image_folder(str(root / "val"), first.class_to_idx)  # numbered by train's classes, also when saved
    assert list(scan_image_folder(str(root / "val"), first.class_to_idx).samples) == list(val.samples)

    def rescanned() -> list:
        walked.clear()
        scan = scan_image_folder(train)
        assert walked, "the tree changed but its saved scan was used"
        return scan.samples.rels()

    shutil.copy(first.samples[0][0], root / "train" / "boxes" / "zz_new.png")
    assert "boxes/zz_new.png" in rescanned()
    os.remove(root / "train" / "discs" / "discs_train_0003.png")
    assert "discs/discs_train_0003.png" not in rescanned()
    os.rename(root / "train" / "stripes" / "stripes_train_0001.png", root / "train" / "stripes" / "renamed.png")
    assert "stripes/renamed.png" in rescanned()
    (root / "train" / "extra").mkdir()
    shutil.copy(first.samples[0][0], root / "train" / "extra" / "e.png")
    assert scan_image_folder(train).classes == ["boxes", "discs", "extra", "stripes", "triangles"]


def test_a_scan_of_a_changing_tree_is_not_saved(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root, ignore=NO_SAVED_SCANS)
    os.utime(root / "train" / "discs", None)  # a folder being written to: its mtime is now
    scan_image_folder(str(root / "train"))
    assert not os.path.exists(root / ".segmae_scan-train.npz")


def test_read_only_data_saves_its_scan_in_the_user_cache(toy_root, tmp_path, monkeypatch):
    root = settled_copy(toy_root, tmp_path)
    (root / ".segmae_scan-train.npz").mkdir()  # the place beside the data cannot take the file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scan = scan_image_folder(str(root / "train"))
    saved = os.listdir(tmp_path / "cache" / "segmae" / "scans")
    assert len(saved) == 1 and not os.listdir(root / ".segmae_scan-train.npz")
    loaded = scan_index.load(str(root / "train"))
    assert loaded["path"].endswith(saved[0]) and loaded["rels"] == scan.samples.rels()
    assert not [n for n in os.listdir(tmp_path / "cache" / "segmae" / "scans") if ".tmp" in n]


def test_the_saved_scan_can_be_turned_off(toy_root, tmp_path, monkeypatch):
    root = settled_copy(toy_root, tmp_path)
    monkeypatch.setenv("SEGMAE_SCAN_INDEX", "0")
    scan_image_folder(str(root / "train"))
    assert not os.path.exists(root / ".segmae_scan-train.npz")


def test_a_damaged_saved_scan_is_scanned_again(toy_root, tmp_path):
    root = settled_copy(toy_root, tmp_path)
    first = scan_image_folder(str(root / "train"))
    (root / ".segmae_scan-train.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert list(scan_image_folder(str(root / "train")).samples) == list(first.samples)


def test_the_walk_of_masks_is_saved_and_a_removed_mask_is_still_found(toy_root, tmp_path, monkeypatch):
    import util.mask_sources.walk as mask_walk
    root = settled_copy(toy_root, tmp_path)
    first = SegmentMaskImageFolder(str(root), with_masks=True)
    assert os.path.isfile(root / ".segmae_scan-masks.npz")
    walks = []
    real_walk = mask_walk._walk
    monkeypatch.setattr(mask_walk, "_walk", lambda *a, **k: walks.append(a[0]) or real_walk(*a, **k))
    again = SegmentMaskImageFolder(str(root), with_masks=True)
    assert walks == [] and again.rel_paths == first.rel_paths and again.source.format == "json"
    rel = first.rel_paths[3]
    os.remove(root / "masks" / (os.path.splitext(rel)[0] + ".json"))
    with pytest.raises(Exception, match="1 of 32 images under .* have no mask file"):
        SegmentMaskImageFolder(str(root), with_masks=True)
    assert walks == [str(root / "masks")]
    left = SegmentMaskImageFolder(str(root), with_masks=True, allow_missing_masks=True)
    assert len(left) == 31 and rel not in left.rel_paths
