"""ImageNet scale: per-image metadata in arrays that forked workers share, and the scans of the
image tree and of masks/ in a tricky tree."""
import gc
import os
import shutil
import types

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from inputs.classification import CheckedImageFolder
from inputs.folders import scan_image_folder
from inputs.images import ImageList
from inputs.pretrain import SegmentMaskImageFolder

OLD = 1_500_000_000  # a date (2017) long before any test runs: the tree has settled


def settled_copy(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (OLD, OLD))
        os.utime(dirpath, (OLD, OLD))
    return root


def test_an_image_list_is_torchvisions_samples(toy_root):
    reference = ImageFolder(os.path.join(toy_root, "train"))
    scan = scan_image_folder(os.path.join(toy_root, "train"))
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


def test_a_removed_mask_is_found_at_the_next_start(toy_root, tmp_path):
    root = settled_copy(toy_root, tmp_path)
    first = SegmentMaskImageFolder(str(root), with_masks=True)
    again = SegmentMaskImageFolder(str(root), with_masks=True)
    assert again.rel_paths == first.rel_paths and again.source.format == "json"
    rel = first.rel_paths[3]
    os.remove(root / "masks" / (os.path.splitext(rel)[0] + ".json"))
    with pytest.raises(Exception, match="1 of 32 images under .* have no mask file"):
        SegmentMaskImageFolder(str(root), with_masks=True)
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
    scan = scan_image_folder(str(train))
    assert list(scan.samples) == reference.samples and scan.classes == reference.classes
    assert sorted(os.path.relpath(p, train) for p in scan.hidden) == ["a/.hidden.png", "a/.hidden_dir", "b/.DS_Store"]
    runs = [(folder, start, end, names.split("\0")) for folder, start, end, names in scan.samples.folders()]
    assert [(f, n) for f, _, _, n in runs] == [
        ("a", ["x.JPEG", "x.b.JPEG", "y.png"]), ("a/folder.png", ["inside.png"]), ("a/sub", ["z.jpg"]),
        ("a/sub/deeper", ["w.jpeg"]), ("b", ["q.PNG", "r.webp"]), ("b/linked", ["l.png"]), ("c", ["k.jpg"])]
    assert all(scan.samples.rel(i) == f"{f}/{n[i - s]}" for f, s, e, n in runs for i in range(s, e))


def test_the_mask_check_finds_each_missing_mask_in_a_tricky_tree(toy_root, tmp_path):
    from sam.listing import check_images
    train = tricky_tree(tmp_path, toy_root)
    masks = train.parent / "masks"
    images = scan_image_folder(str(train)).samples
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
    here = check_images(str(masks), images)
    assert here.format == "json"
    assert here.missing.tolist() == expected
