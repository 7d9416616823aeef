"""Data trees that used to train silently on the wrong data or end in a library's traceback: a val/
with a subset of train/'s classes, symlink loops, the flat ImageNet val tarball, hidden files and
empty class folders. docs/RELIABILITY.md lists them with their outcome."""
import argparse
import os
import shutil

import pytest

import evals.knn as knn
from inputs.classification import CheckedImageFolder, build_classification_datasets, build_eval_transform
from inputs.images import DataError
from inputs.pretrain import build_pretrain_dataset
from tools import check_dataset, sort_imagenet_val


def copy_tree(toy_root, tmp_path, name="data"):
    root = tmp_path / name
    shutil.copytree(toy_root, root)
    return root


def ft_args(root, **kw):
    args = argparse.Namespace(data_path=str(root), input_size=32, seed=0, nb_classes=4, given_flags=["nb_classes"])
    vars(args).update(kw)
    return args


def eval_transform(is_train, args):
    return build_eval_transform(args.input_size)


def pretrain_set(root, with_masks=False):
    return build_pretrain_dataset(str(root), transform=None, with_masks=with_masks)


# ---- 1. val/ numbered by train/'s classes ---------------------------------------------------------

def test_val_with_a_subset_of_the_classes_keeps_trains_labels(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    for c in ("boxes", "stripes", "triangles"):
        shutil.rmtree(root / "val" / c)
    train, val = build_classification_datasets(ft_args(root), eval_transform)
    assert train.class_to_idx == {"boxes": 0, "discs": 1, "stripes": 2, "triangles": 3}
    assert len(val) == 2 and set(val.targets) == {1}  # discs is class 1, as in train/
    assert [t for _, t in val.samples] == [1, 1]


def test_val_class_that_train_lacks_is_named(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    shutil.copytree(root / "val" / "discs", root / "val" / "cats")
    with pytest.raises(DataError, match=r"val has 1 class folder\(s\) that train/ lacks: cats"):
        build_classification_datasets(ft_args(root), eval_transform)


def test_knn_scores_val_by_trains_labels(pretrained, toy_root, tmp_path, monkeypatch):
    root = copy_tree(toy_root, tmp_path)
    for c in ("boxes", "discs", "stripes"):
        shutil.rmtree(root / "val" / c)
    seen = {}

    def capture(bank, bank_labels, queries, query_labels, n_classes, k, temperature):
        seen["labels"], seen["classes"] = query_labels.tolist(), n_classes
        return 0.0

    monkeypatch.setattr(knn, "knn_top1", capture)
    knn.knn_eval(knn.get_args_parser().parse_args(
        ["--checkpoint", pretrained["patches"], "--data_path", str(root), "--device", "cpu", "--num_workers", "0"]))
    assert seen == {"labels": [3, 3], "classes": 4}  # triangles is train/'s class 3


# ---- 2. a folder reached twice --------------------------------------------------------------------

@pytest.mark.parametrize("link, target", [("train/discs/loop_up", ".."), ("train/again", ".")])
def test_symlink_loops_are_refused_by_every_scan(toy_root, tmp_path, link, target):
    root = copy_tree(toy_root, tmp_path)
    os.symlink(target, root / link)
    with pytest.raises(DataError, match="reached a second time"):
        pretrain_set(root)
    with pytest.raises(DataError, match="reached a second time"):
        build_classification_datasets(ft_args(root), eval_transform)
    report = check_dataset.check(str(root))
    assert any("reached a second time" in p for p in report["problems"]) and report["images"] == 0


def test_two_links_to_one_folder_are_refused(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    os.symlink(root / "train" / "discs", root / "train" / "discs2")
    with pytest.raises(DataError, match=r"discs2 is the folder .*discs reached a second time"):
        pretrain_set(root)


def test_a_symlinked_class_folder_is_still_read(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    shutil.move(str(root / "train" / "discs"), str(tmp_path / "elsewhere"))
    os.symlink(tmp_path / "elsewhere", root / "train" / "discs")
    assert len(pretrain_set(root)) == 32


# ---- 8. the flat ImageNet val tarball --------------------------------------------------------------

def flatten_val(root):
    """val/ as the official tarball has it: ILSVRC2012_val_<n>.JPEG directly inside; returns the wnids."""
    labels = []
    n = 0
    for c in sorted(os.listdir(root / "val")):
        for f in sorted(os.listdir(root / "val" / c)):
            n += 1
            os.replace(root / "val" / c / f, root / "val" / f"ILSVRC2012_val_{n:08d}.png")
            labels.append(c)
        os.rmdir(root / "val" / c)
    return labels


def test_flat_val_is_named_with_the_sorting_tool(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    flatten_val(root)
    with pytest.raises(DataError, match=r"holds 8 images directly, not in class folders.*tools/sort_imagenet_val.py"):
        build_classification_datasets(ft_args(root), eval_transform)
    report = check_dataset.check(str(root))
    assert any("sort_imagenet_val.py" in p for p in report["problems"])


@pytest.mark.parametrize("label_format", ["kaggle", "devkit", "pairs"])
def test_sort_imagenet_val_makes_class_folders(toy_root, tmp_path, label_format):
    root = copy_tree(toy_root, tmp_path)
    truth = flatten_val(root)
    names = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(len(truth))]
    labels = tmp_path / "labels.txt"
    argv = ["--val_dir", str(root / "val"), "--labels", str(labels)]
    if label_format == "kaggle":
        labels.write_text("ImageId,PredictionString\n" + "".join(f"{n},{c} 1 2 3 4\n" for n, c in zip(names, truth)))
    elif label_format == "pairs":
        labels.write_text("".join(f"{n}.png {c}\n" for n, c in zip(names, truth)))
    else:  # IDs in the devkit's order, which is not the sorted one
        order = ["triangles", "boxes", "stripes", "discs"]
        (tmp_path / "synsets.txt").write_text("\n".join(order) + "\n")
        labels.write_text("".join(f"{order.index(c) + 1}\n" for c in truth))
        argv += ["--synsets", str(tmp_path / "synsets.txt")]
    assert sort_imagenet_val.main(argv) == 0
    train, val = build_classification_datasets(ft_args(root), eval_transform)
    assert [train.classes[t] for t in val.targets] == truth
    assert sort_imagenet_val.main(argv) == 0  # a second run has nothing left to move
    assert check_dataset.check(str(root))["val"] == 8


def test_sort_imagenet_val_refuses_unlabelled_images(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    flatten_val(root)
    (tmp_path / "labels.txt").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,boxes 1 2 3 4\n")
    with pytest.raises(Exception, match="7 images .* are not in the labels file"):
        sort_imagenet_val.main(["--val_dir", str(root / "val"), "--labels", str(tmp_path / "labels.txt")])
    assert len(os.listdir(root / "val")) == 8  # nothing moved


# ---- 11. hidden files, empty class folders --------------------------------------------------------

def add_hidden(root):
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "discs" / "._discs_train_0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "val" / "discs" / "._discs_val_0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")


def test_hidden_files_and_folders_are_skipped_and_counted(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    add_hidden(root)
    ds = pretrain_set(root, with_masks=True)
    assert len(ds) == 32 and ds.folders[0].classes == ["boxes", "discs", "stripes", "triangles"]
    train, val = build_classification_datasets(ft_args(root), eval_transform)
    assert len(train) == 32 and len(val) == 8
    assert all(not os.path.basename(p).startswith(".") for p, _ in train.samples + val.samples)
    report = check_dataset.check(str(root))
    assert report["problems"] == [] and report["hidden"] == 2 and report["images"] == 32


def test_hidden_ade20k_files_are_not_images(toy_ade20k, tmp_path):
    from segmenter.data import ADE20K
    root = tmp_path / "ade"
    shutil.copytree(toy_ade20k, root)
    (root / "images" / "training" / "._ADE_train_00000000.jpg").write_bytes(b"\x00\x05\x16\x07")
    assert len(ADE20K(str(root), "train", transform=None)) == 24


def test_empty_class_folder_in_finetuning_is_one_line(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    (root / "train" / "cats").mkdir()
    with pytest.raises(DataError, match=r"1 class folder\(s\) hold no image: .*train/cats"):
        CheckedImageFolder(str(root / "train"), transform=None)


# ---- 10. deeply nested JSON, malformed mask files in the cache builder ----------------------------

def first_mask_file(root):
    cls = sorted(os.listdir(root / "masks"))[0]
    return root / "masks" / cls / sorted(os.listdir(root / "masks" / cls))[0]


def test_deeply_nested_mask_json_is_a_bad_sample(toy_root, tmp_path):
    import json

    from test_pretrain_cli import common

    import main_pretrain
    root = copy_tree(toy_root, tmp_path)
    mask = first_mask_file(root)
    mask.write_text("[" * 200_000 + "]" * 200_000)
    out = tmp_path / "o"
    main_pretrain.cli(common(str(root), out, "--mask_method", "segments", "--skip_bad_samples"))
    assert json.loads((out / "log.txt").read_text())["train_bad_samples"] == 1
    assert f"{mask.name}: JSON nested too deeply" in (out / "bad_samples.txt").read_text()
    report = check_dataset.check(str(root))
    assert [p for p in report["problems"] if "nested too deeply" in p]


@pytest.mark.parametrize("content", ["[" * 200_000 + "]" * 200_000,  # nested
                                     '[{"area": 10, "segmentation": [[1.0, 2.0, 5.0, 2.0, 5.0, 6.0]]}]'])  # polygon
def test_mask_cache_builder_names_a_malformed_file_in_one_line(toy_root, tmp_path, content, capsys):
    from run.setup import run_tool
    from tools import build_mask_cache
    root = copy_tree(toy_root, tmp_path)
    mask = first_mask_file(root)
    mask.write_text(content)
    with pytest.raises(SystemExit) as exc:  # the tool's __main__: run_tool(main)
        run_tool(build_mask_cache.main, ["--data_path", str(root)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("ERROR:") and mask.name in line
    assert not [f for _, _, files in os.walk(root) for f in files if ".tmp" in f]


# ---- 12. segmenter.prepare_ade20k ----------------------------------------------------------------

def test_prepare_ade20k_wrong_sha1_of_the_users_zip_says_it_was_left(tmp_path):
    from test_segmenter import make_zip

    from segmenter import prepare_ade20k
    archive, _ = make_zip(tmp_path)
    with pytest.raises(SystemExit, match="was left as it is") as exc:
        prepare_ade20k.main(["--out", str(tmp_path / "out"), "--zip", str(archive), "--sha1", "0" * 40])
    assert "moved" not in str(exc.value) and archive.exists()


def test_prepare_ade20k_folder_over_an_incomplete_copy(tmp_path):
    from test_segmenter import make_zip

    from segmenter import prepare_ade20k
    archive, sha1 = make_zip(tmp_path)
    good = prepare_ade20k.main(["--out", str(tmp_path / "b"), "--zip", str(archive), "--sha1", sha1])
    assert good is None
    complete = tmp_path / "b" / "ADEChallengeData2016"
    target = tmp_path / "c" / "ADEChallengeData2016"
    (target / "images" / "training").mkdir(parents=True)  # an interrupted copy by hand
    with pytest.raises(SystemExit, match=r"exists but is incomplete \(needs images/training.*rm -r"):
        prepare_ade20k.main(["--out", str(tmp_path / "c"), "--folder", str(complete)])
    shutil.rmtree(target)
    os.symlink(tmp_path / "moved_away", target)  # a link left by an earlier --folder
    prepare_ade20k.main(["--out", str(tmp_path / "c"), "--folder", str(complete)])
    assert prepare_ade20k.is_complete(str(target))


def test_prepare_ade20k_member_both_file_and_folder(tmp_path):
    import zipfile

    from segmenter import prepare_ade20k
    archive = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ADEChallengeData2016/images/training/ADE_x.png", b"x")
        z.writestr("ADEChallengeData2016/images/training", b"a file where a folder is")
    with pytest.raises(SystemExit, match="cannot unpack .*a damaged or foreign archive"):
        prepare_ade20k.main(["--out", str(tmp_path / "out"), "--zip", str(archive), "--sha1", ""])
    assert os.listdir(tmp_path / "out") == []  # no unpacking folder left


# ---- 7. temporary files of killed writers, two mask generators on one tree ------------------------

def images_only(toy_root, tmp_path):
    root = copy_tree(toy_root, tmp_path)
    shutil.rmtree(root / "masks")
    (root / "masks" / "discs").mkdir(parents=True)
    return root


def test_generate_masks_removes_what_killed_runs_left(toy_root, tmp_path):
    from run import claims
    from tools import generate_masks
    root = images_only(toy_root, tmp_path)
    dead = root / "masks" / "discs" / ".discs_train_0000.json.tmp99999999"
    dead.write_text('{"half": ')
    import socket
    (root / "masks" / "discs" / ".discs_train_0000.json.claim").write_text(f"{socket.gethostname()} 99999999\n")
    live = root / "masks" / "discs" / ".discs_train_0001.json.tmp1"
    live.write_text('{"being written')
    assert claims.try_claim(str(root / "masks" / "discs" / "discs_train_0001.json"))  # held by this process
    summary = generate_masks.generate(str(root), generate_masks.superpixel_backend, log_every=0)
    assert not dead.exists() and live.exists()  # a live writer's file is left alone
    assert summary["generated"] == 31 and summary["done_by_another_run"] == 1  # the claimed image is not done
    claims.release(str(root / "masks" / "discs" / "discs_train_0001.json"))
    os.remove(live)
    assert generate_masks.generate(str(root), generate_masks.superpixel_backend, log_every=0)["generated"] == 1
    assert not [f for f in os.listdir(root / "masks" / "discs") if f.startswith(".")]


def test_two_concurrent_mask_generators_share_the_work(toy_root, tmp_path):
    import threading
    import time

    from tools import generate_masks
    root = images_only(toy_root, tmp_path)

    def slow_factory():
        real = generate_masks.superpixel_backend()

        def backend(img):
            time.sleep(0.02)
            return real(img)
        return backend
    slow_factory.settings = generate_masks.superpixel_backend.settings
    results = []
    runs = [threading.Thread(target=lambda: results.append(generate_masks.generate(str(root), slow_factory,
                                                                                    log_every=0)))
            for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sorted(r["generated"] + r["done_by_another_run"] for r in results) == [32, 32]
    assert sum(r["generated"] for r in results) == 32  # every image computed once
    assert min(r["generated"] for r in results) > 0  # and both runs did some


def test_mask_cache_builder_removes_a_killed_builders_temp_file(toy_root, tmp_path):
    from inputs.folders import list_images
    from sam.cache import build_mask_cache
    root = copy_tree(toy_root, tmp_path)
    (root / "masks_cache").mkdir()
    stale = root / "masks_cache" / ".coverage_50.bin.tmp99999999"
    stale.write_bytes(b"x" * 1000)
    build_mask_cache(str(root), list_images(str(root / "train")), 50.0)
    assert not stale.exists() and (root / "masks_cache" / "coverage_50.bin").exists()


def test_a_claim_from_another_host_expires(tmp_path):
    import time

    from run import claims
    out = tmp_path / "x.json"
    (tmp_path / ".x.json.claim").write_text("other-host 123\n")
    assert not claims.try_claim(str(out))  # a run elsewhere is on it
    old = time.time() - claims.CLAIM_TTL_S - 1
    os.utime(tmp_path / ".x.json.claim", (old, old))
    assert claims.try_claim(str(out))  # that run died long ago
