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
    real_walk = image_folders.walk_images
    monkeypatch.setattr(image_folders, "walk_images", lambda *a, **k: walked.append(a) or real_walk(*a, **k))
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
    assert loaded["path"].endswith(saved[0]) and loaded["rels"] == "\0".join(scan.samples.rels())
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


def tricky_tree(tmp_path, toy_root):
    """Class folders with what a real tree holds besides flat images: sub-folders (one linked), a
    folder named like an image beside them, hidden files and folders, other files, upper-case
    extensions, and names whose stem is another's stem plus a dot."""
    src = sorted(glob_images(toy_root))[0]
    train = tmp_path / "tricky" / "train"
    for rel in ["a/x.JPEG", "a/x.b.JPEG", "a/y.png", "a/sub/z.jpg", "a/sub/deeper/w.jpeg", "a/.hidden.png",
                "a/.hidden_dir/h.png", "a/notes.txt", "b/q.PNG", "b/r.webp", "../elsewhere/l.png", "c/k.jpg", "c/readme.md", "b/.DS_Store"]:
        (train / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, train / rel)
    (train / "a" / "folder.png").mkdir()  # a folder named like an image, in a folder with sub-folders
    (train / "a" / "folder.png" / "inside.png").write_bytes((train / "a" / "y.png").read_bytes())
    os.symlink(train.parent / "elsewhere", train / "b" / "linked")
    return train


def glob_images(root):
    import glob
    return glob.glob(os.path.join(root, "train", "*", "*.png"))


def test_the_scan_lists_what_torchvision_lists_in_a_tricky_tree(toy_root, tmp_path):
    train = tricky_tree(tmp_path, toy_root)
    visible = lambda path: not any(part.startswith(".") for part in os.path.relpath(path, train).split(os.sep))
    reference = ImageFolder(str(train), is_valid_file=lambda p: visible(p) and p.lower().endswith(
        (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")))
    scan = scan_image_folder(str(train), use_index=False)
    assert list(scan.samples) == reference.samples and scan.classes == reference.classes
    assert sorted(os.path.relpath(p, train) for p in scan.hidden) == ["a/.hidden.png", "a/.hidden_dir", "b/.DS_Store"]
    runs = [(folder, start, end, names.split("\0")) for folder, start, end, names in scan.samples.folders()]
    assert [(f, n) for f, _, _, n in runs] == [
        ("a", ["x.JPEG", "x.b.JPEG", "y.png"]), ("a/folder.png", ["inside.png"]), ("a/sub", ["z.jpg"]),
        ("a/sub/deeper", ["w.jpeg"]), ("b", ["q.PNG", "r.webp"]), ("b/linked", ["l.png"]), ("c", ["k.jpg"])]
    assert all(scan.samples.rel(i) == f"{f}/{n[i - s]}" for f, s, e, n in runs for i in range(s, e))


def test_the_mask_check_finds_each_missing_mask_in_a_tricky_tree(toy_root, tmp_path, monkeypatch):
    from util.mask_sources import check_images
    from util.mask_sources import listing
    train = tricky_tree(tmp_path, toy_root)
    masks = train.parent / "masks"
    images = scan_image_folder(str(train), use_index=False).samples
    lacking = {"a/x.b", "a/sub/deeper/w", "b/linked/l"}
    for rel in images.rels():
        stem = os.path.splitext(rel)[0]
        if stem not in lacking:
            (masks / (stem + ".json")).parent.mkdir(parents=True, exist_ok=True)
            (masks / (stem + ".json")).write_text("[]")
    (masks / "a" / ".x.json").write_text("[]")  # hidden, and a mask of no image: neither counts
    (masks / "c" / "gone.json").write_text("[]")
    (masks / "b" / "linked").mkdir()
    os.symlink(tmp_path / "nothing.json", masks / "b" / "linked" / "l.json")  # a link to nothing: missing
    expected = sorted(i for i, rel in enumerate(images.rels()) if os.path.splitext(rel)[0] in lacking)
    in_background = check_images(str(masks), images, background=listing.ListedInBackground(str(masks)))
    monkeypatch.setenv("SEGMAE_SCAN_INDEX", "0")  # the same check again, every folder listed here
    here = check_images(str(masks), images)
    assert in_background.format == here.format == "json"
    assert in_background.missing.tolist() == here.missing.tolist() == expected


def test_a_second_process_lists_masks_at_a_first_start_only(toy_root, tmp_path, monkeypatch):
    import util.image_roots as image_roots
    root = settled_copy(toy_root, tmp_path)
    started = []
    real = image_roots.ListedInBackground
    monkeypatch.setattr(image_roots, "ListedInBackground", lambda *a: started.append(a) or real(*a))
    first = SegmentMaskImageFolder(str(root), with_masks=True)
    assert started == [(str(root / "masks"),)]
    again = SegmentMaskImageFolder(str(root), with_masks=True)  # reads the saved check
    assert len(started) == 1 and again.rel_paths == first.rel_paths
    assert not SegmentMaskImageFolder(str(root), with_masks=False).source and len(started) == 1
