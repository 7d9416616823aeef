"""Issue 46's data, mask and shard faults (docs/RELIABILITY.md, "Crafted shards, lying counts and
photos' orientations"): tar members bounded by their header, LMDB counts checked, shard indexes
naming only their own folder, a shard writer that leaves exactly its own shards, masks of
EXIF-oriented photos in the right frame for all eight orientations, claims of reused pids,
staleness by ctime, a truncated LMDB, damaged shards, float TIFFs, and the loader workers' memory."""
import csv
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from test_pretrain_cli import common

import main_pretrain
from conftest import REPO
from inputs.pretrain import SegmentMaskImageFolder
from inputs.shards import build_shard_dataset
from sam.cache import build_mask_cache
from sam.listing import AMG_HEADER
from tools import check_dataset, convert_masks, generate_masks
from tools.write_shards import write_shards


def identity(img, mask=None, generator=None):
    return (img, mask) if mask is not None else img


# ---- 11. masks of EXIF-oriented photos, all eight orientations ------------------------------------

def displayed_by_spec(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The displayed picture of stored pixels under an EXIF orientation, as the EXIF specification
    defines it (what OpenCV's imread, and so SAM's amg.py, hands to SAM)."""
    return {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
            5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1),
            7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}[orientation](pixels)


def photo(h: int, w: int) -> np.ndarray:
    """A dark picture with one bright object placed so that every orientation moves it."""
    img = np.full((h, w, 3), 30, np.uint8)
    img[h // 12: h // 3, w // 2: w * 7 // 8] = 235
    return img


def bright(pixels) -> np.ndarray:
    return (np.asarray(pixels.convert("L") if isinstance(pixels, Image.Image) else pixels.mean(-1)) > 128
            ).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


SHAPES = {"square": (32, 32), "wide": (24, 40)}
ORIENTED = [(o, shape) for o in range(1, 9) for shape in SHAPES]


def oriented_photos(root) -> dict[str, np.ndarray]:
    """train/c/o<k>_<shape>.jpg for every orientation and shape; {rel: the object in its stored pixels}."""
    os.makedirs(root / "train" / "c", exist_ok=True)
    truth = {}
    for o, shape in ORIENTED:
        rel = f"c/o{o}_{shape}.jpg"
        exif = Image.Exif()
        exif[0x0112] = o
        Image.fromarray(photo(*SHAPES[shape])).save(root / "train" / rel, exif=exif, quality=95)
        stored = Image.open(root / "train" / rel)
        truth[rel] = bright(stored)
        # the test's own reading of the EXIF specification agrees with Pillow's (and OpenCV's)
        assert np.array_equal(displayed_by_spec(np.asarray(stored), o), np.asarray(ImageOps.exif_transpose(stored)))
    return truth


def amg_masks(root, rel: str, mask: np.ndarray) -> None:
    """masks/<stem>/0.png + metadata.csv as segment-anything's scripts/amg.py writes them."""
    folder = root / "masks" / os.path.splitext(rel)[0]
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(mask * 255).save(folder / "0.png")
    ys, xs = np.nonzero(mask)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(AMG_HEADER)
        writer.writerow([0, int(mask.sum()), xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1, 1, 1, 0.9, 0.95,
                         0, 0, mask.shape[1], mask.shape[0]])


def bright_segmenter(img: np.ndarray) -> list[dict]:
    return generate_masks.annotations_from_masks([bright(img)])


@pytest.fixture(scope="module")
def oriented_trees(tmp_path_factory):
    """The same sixteen photos with masks made both ways: by this repo's generator (it reads the
    stored pixels) and as amg.py makes them (on the displayed picture)."""
    trees = {}
    for maker in ("generator", "amg"):
        root = tmp_path_factory.mktemp(maker)
        truth = oriented_photos(root)
        if maker == "generator":
            summary = generate_masks.generate(str(root), lambda: bright_segmenter, log_every=0,
                                              settings={"backend": "sam", "model": "vit_b"})
            assert summary["generated"] == len(ORIENTED)
        else:
            for rel in truth:
                displayed = ImageOps.exif_transpose(Image.open(root / "train" / rel))
                amg_masks(root, rel, bright(displayed))
        trees[maker] = (root, truth)
    return trees


@pytest.mark.parametrize("maker", ["generator", "amg"])
def test_every_orientation_hides_the_object_in_training_the_cache_and_the_checker(oriented_trees, maker):
    root, truth = oriented_trees[maker]
    folder = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=10)
    direct = {}
    for i, rel in enumerate(folder.rel_paths):
        img, mask, _ = folder[i]
        assert mask.shape == (img.height, img.width) and iou(mask, truth[rel]) > 0.9, (rel, iou(mask, truth[rel]))
        direct[rel] = mask
    report = check_dataset.check(str(root), coverage=10)
    assert not report["problems"] and not report["undetermined"]
    build_mask_cache(str(root), folder.rel_paths, 10.0)
    cached = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=10)
    assert cached.cache is not None
    for i, rel in enumerate(cached.rel_paths):
        assert np.array_equal(cached[i][1], direct[rel]), rel
    shutil.rmtree(root / "masks_cache")


def test_every_orientation_in_shards_and_in_json_converted_from_amg(oriented_trees, tmp_path):
    root, truth = oriented_trees["amg"]
    out = tmp_path / "shards"
    write_shards(str(root), str(out), samples_per_shard=8)
    dataset = build_shard_dataset([str(out)], identity, True, 10, 4, 1, 0, 0, 0, False, True)
    plan = [(s, 0, int(c), 0) for s, c in zip(dataset.shards, dataset.counts)]
    samples = [sample for _, sample in dataset._samples(plan)]
    assert len(samples) == len(truth)
    for sample in samples:
        _, mask, _ = dataset.read(sample, "x")
        rel = sample["path"].decode()
        assert iou(mask, truth[rel]) > 0.9, rel
    converted = tmp_path / "converted"
    shutil.copytree(root / "train", converted / "train")
    convert_masks.convert(str(root), str(converted / "masks"))  # SAM's JSON, recording its source layout
    folder = SegmentMaskImageFolder(str(converted), with_masks=True, coverage_ratio=10)
    for i, rel in enumerate(folder.rel_paths):
        assert iou(folder[i][1], truth[rel]) > 0.9, rel


def test_the_checker_says_when_it_cannot_tell_the_frame(tmp_path, capsys):
    """A bare SAM JSON (no generator entry) for a mirrored photo: stored pixels or displayed picture
    cannot be told apart; the report says so instead of "no problems found"."""
    root = tmp_path / "data"
    truth = oriented_photos(root)
    for rel in truth:
        if rel != "c/o3_wide.jpg":
            os.remove(root / "train" / rel)
    path = root / "masks" / "c" / "o3_wide.json"
    os.makedirs(path.parent)
    anns = generate_masks.annotations_from_masks([truth["c/o3_wide.jpg"]])
    path.write_text(json.dumps(anns))
    assert check_dataset.main(["--data_path", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" not in out and "1 images' masks could not be checked" in out
    assert "c/o3_wide.jpg" in out and '"frame": "displayed"' in out


# ---- 2, 25. tar shards: members bounded by their header, damaged shards in one line ----------------

def png_bytes(value=200, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def sparse_member(name: str, claimed: int) -> bytes:
    """An old-GNU sparse member: 512 bytes in the tar, ``claimed`` bytes once expanded (its header
    says so), as a 10 KB crafted shard asks for gigabytes."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    octal = lambda value: b"%011o\0" % value  # noqa: E731
    header[156:157] = b"S"
    header[386:410] = octal(claimed - 512) + octal(512)  # one run of data, at the very end
    header[483:495] = octal(claimed)  # the expanded size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\x01" * 512


def write_tar(path, members: list[bytes]) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(members) + b"\0" * 1024)
    return str(path)


def index_folder(folder, shards: dict[str, int], classes=("c",)):
    (folder / "shards.json").write_text(json.dumps({"shards": [{"name": n, "samples": c} for n, c in shards.items()],
                                                    "classes": list(classes)}))


def shard_dataset(folder, skip_bad_samples=False, with_masks=False):
    return build_shard_dataset([str(folder)], identity, with_masks, 50, 1, 1, 0, 0, 0, skip_bad_samples, True)


def read_all(dataset):
    plan = [(s, 0, int(c), 0) for s, c in zip(dataset.shards, dataset.counts)]
    return [dataset.prepare(sample, position, 0) for position, sample in dataset._samples(plan)]


def test_a_sparse_member_claiming_more_than_the_limit_is_a_named_bad_sample(tmp_path):
    from inputs.images import DataError
    from inputs.pretrain import BadSample
    folder = tmp_path / "shards"
    folder.mkdir()
    claimed = 200 * 10 ** 6  # over the 100 MB limit (a crafted one asked for 64 GB)
    write_tar(folder / "a.tar", [member("0.png", png_bytes()), member("0.cls", b"0"),
                                 sparse_member("1.png", claimed), member("1.cls", b"0"),
                                 member("2.png", png_bytes(90))])
    index_folder(folder, {"a.tar": 3})
    with pytest.raises(DataError, match=r"a\.tar: member 1\.png claims 200,000,000 bytes, over the 100,000,000 .*"
                                        r"SEGMAE_MAX_SHARD_MEMBER_MB"):
        read_all(shard_dataset(folder))
    read = read_all(shard_dataset(folder, skip_bad_samples=True))
    assert [type(r).__name__ for r in read] == ["tuple", "BadSample", "tuple"]
    assert isinstance(read[1], BadSample) and "1.png claims 200,000,000 bytes" in read[1].message


def test_damaged_shards_and_indexes_are_one_line(toy_root, tmp_path, capsys):
    from inputs.images import DataError
    shards = tmp_path / "shards"
    write_shards(toy_root, str(shards), samples_per_shard=16)
    # a truncated shard, its count in shards.json: one line, not tarfile's traceback
    path = shards / "shard-000000.tar"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 100)
    with pytest.raises(DataError, match=r"cannot read shard .*shard-000000\.tar at .*truncated or damaged"):
        read_all(shard_dataset(shards))
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(str(shards), tmp_path / "o", "--batch_size", "4"))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("ERROR:")][0].count("shard-000000.tar") >= 1
    # an adjacent duplicate key
    folder = tmp_path / "dup"
    folder.mkdir()
    write_tar(folder / "a.tar", [member("0.png", png_bytes()), member("0.png", png_bytes())])
    index_folder(folder, {"a.tar": 1})
    with pytest.raises(DataError, match=r"a\.tar: 0\.png appears twice in a row \(a duplicate key\)"):
        read_all(shard_dataset(folder))
    # counts that are no counts
    for samples in ("abc", -5, 2.5, True):
        index_folder(folder, {"a.tar": samples})
        with pytest.raises(DataError, match=r"shards\.json: shard a\.tar has .* samples, not a whole number >= 0"):
            shard_dataset(folder)


def test_a_class_that_is_no_number_is_ignored_with_a_note(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", [member("0.png", png_bytes()), member("0.cls", b"abc"),
                                 member("1.png", png_bytes()), member("1.cls", b"x y")])
    index_folder(folder, {"a.tar": 2})
    read = read_all(shard_dataset(folder))
    assert [label for _, label in read] == [0, 0]
    out = capsys.readouterr().out
    assert out.count("NOTE:") == 1 and "0.cls holds b'abc', not a class index: read as class 0" in out


# ---- 4, 10. a shard folder is read by its shards.json, which names its own files only ---------------

@pytest.mark.parametrize("name", ["../outside.tar", "/tmp/outside.tar", "sub/../../outside.tar", ".."])
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    from inputs.images import DataError
    from inputs.shards import expand_shards
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", [member("0.png", png_bytes())])
    write_tar(tmp_path / "outside.tar", [member("9.png", png_bytes())])
    index_folder(folder, {"a.tar": 1, name: 1})
    with pytest.raises(DataError, match=r"shards\.json: shard entry 1 names .* which is not a file of"):
        expand_shards(str(folder))
    with pytest.raises(DataError, match="which is not a file of"):
        shard_dataset(folder)


def test_a_crafted_counts_file_is_counted_again(tmp_path, capsys):
    from inputs.shards import COUNTS_FILE, shard_counts
    folder = tmp_path / "sa1b"
    folder.mkdir()
    tar = write_tar(folder / "a.tar", [member("0.png", png_bytes()), member("1.png", png_bytes())])
    st = os.stat(tar)
    (folder / COUNTS_FILE).write_text(json.dumps({"a.tar": [st.st_size, st.st_ctime_ns, 7],
                                                  "../../outside.tar": [1, 1, 1]}))
    assert shard_counts([tar])[0] == [2]
    assert "not a shard count of its folder" in capsys.readouterr().out
    assert json.loads((folder / COUNTS_FILE).read_text()) == {"a.tar": [st.st_size, st.st_ctime_ns, 2]}


def test_other_files_beside_the_data_name_nothing_outside_it(tmp_path):
    """amg.py's metadata.csv ids and the mask cache's paths: a crafted one is refused, never followed."""
    from sam.files import MaskFileError
    root = tmp_path / "data"
    oriented_photos(root)
    for rel in list((root / "train" / "c").iterdir())[2:]:
        os.remove(rel)
    rels = sorted(f"c/{p.name}" for p in (root / "train" / "c").iterdir())
    for rel in rels:
        amg_masks(root, rel, bright(Image.open(root / "train" / rel)))
    build_mask_cache(str(root), rels, 10.0)
    index = root / "masks_cache" / "coverage_10.npz"
    with np.load(index) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["keys"] = np.array(["../../outside/x.jpg", *arrays["keys"][1:].tolist()])
    os.makedirs(tmp_path / "outside" / "x")
    with open(index, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(MaskFileError, match=r"coverage_10\.npz names a path outside .* \(an absolute path or '\.\.'\)"):
        SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=10)
    shutil.rmtree(root / "masks_cache")
    Image.fromarray(np.ones((32, 32), np.uint8) * 255).save(tmp_path / "secret.png")
    metadata = root / "masks" / os.path.splitext(rels[0])[0] / "metadata.csv"
    rows = metadata.read_text().splitlines()
    metadata.write_text("\n".join([rows[0], "../../../../secret" + rows[1][1:]]) + "\n")
    with pytest.raises(MaskFileError, match=r"metadata\.csv: the id '\.\./\.\./\.\./\.\./secret' is not the name of a PNG"):
        SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=10)[0]


def test_a_writer_rerun_leaves_exactly_its_own_shards(toy_root, tmp_path, capsys):
    from inputs.images import DataError
    from util.misc import UserError
    out = tmp_path / "shards"
    write_shards(toy_root, str(out), samples_per_shard=7)  # 5 shards
    write_shards(toy_root, str(out), samples_per_shard=16)  # 2 shards: the other 3 are the first run's
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard-000001.tar", "shards.json"]
    assert shard_dataset(out).total == 32
    # a .tar no writer listed: the folder is read by its shards.json only, and a writer refuses it
    shutil.copy(out / "shard-000000.tar", out / "other.tar")
    assert shard_dataset(out).total == 32
    assert "1 .tar file(s) in" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"holds 1 \.tar file\(s\) that no earlier tools/write_shards\.py run .*"
                                        r"other\.tar"):
        write_shards(toy_root, str(out), samples_per_shard=7)
    assert sorted(os.listdir(out)) == ["other.tar", "shard-000000.tar", "shard-000001.tar", "shards.json"]
    os.remove(out / "other.tar")
    # a writer killed after its first shard: the folder is refused until a rerun finishes
    real = tarfile.TarFile.addfile
    calls = []

    def dies(self, *a, **k):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    import webdataset.writer
    with pytest.MonkeyPatch.context() as m:
        m.setattr(webdataset.writer.tarfile.TarFile, "addfile", dies)
        with pytest.raises(KeyboardInterrupt):
            write_shards(toy_root, str(out), samples_per_shard=4)
    with pytest.raises(DataError, match=r"a tools/write_shards\.py run into .* did not finish"):
        shard_dataset(out)
    write_shards(toy_root, str(out), samples_per_shard=4)
    assert len([n for n in os.listdir(out) if n.endswith(".tar")]) == 8 and shard_dataset(out).total == 32


# ---- 3, 24. an LMDB's count is checked; a database truncated under a run is one line --------------

def write_lmdb(path, count: int, images: list[bytes]) -> str:
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"num-samples", str(count).encode())
        for i, data in enumerate(images, 1):
            txn.put(f"image-{i:09d}".encode(), data)
            txn.put(f"label-{i:09d}".encode(), b"text")
    env.close()
    return str(path)


@pytest.mark.parametrize("count", [10 ** 6, 10 ** 12, 17])
def test_an_lmdb_count_beyond_its_images_is_refused_at_start(tmp_path, count):
    from inputs.images import DataError
    from inputs.pretrain import build_pretrain_dataset, build_pretrain_transform
    root = write_lmdb(tmp_path / "lines", count, [png_bytes()] * 16)
    with pytest.raises(DataError, match=rf"'num-samples' says {count:,} images, but image-0*{count} does not exist "
                                        r"\(the last image key is image-000000016\)"):
        build_pretrain_dataset(root, build_pretrain_transform(32), with_masks=False)


def test_skip_bad_samples_stops_past_its_share_and_prints_counts(tmp_path, capsys):
    good, bad = png_bytes(), b"not an image"
    root = write_lmdb(tmp_path / "lines", 40, [bad if i % 3 == 0 else good for i in range(40)])  # 14 unreadable
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(root, tmp_path / "strict", "--skip_bad_samples"))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert "unreadable samples skipped so far in epoch 0, more than --max_bad_percent 1 of the epoch's 40" in err
    out = tmp_path / "lenient"
    main_pretrain.cli(common(root, out, "--skip_bad_samples", "--max_bad_percent", "50"))
    printed = capsys.readouterr().out
    assert "14 unreadable samples of 40 (35.00 %) skipped in epoch 0" in printed
    assert printed.count("cannot read image") == 3  # a few examples, not one line per sample
    assert len((out / "bad_samples.txt").read_text().splitlines()) == 14


def test_an_lmdb_truncated_under_a_running_job_is_one_line(tmp_path):
    root = write_lmdb(tmp_path / "lines", 16, [png_bytes(size=(64, 64))] * 16)
    script = f"""
import os, sys
sys.path.insert(0, {REPO!r})
from inputs.lmdb import LmdbImages
from util.misc import UserError
images = LmdbImages({root!r})
images.read(0)
with open(os.path.join({root!r}, "data.mdb"), "r+b") as f:
    f.truncate(8192)
try:
    images.read(15)
except UserError as e:
    print("ERROR:", e)
    sys.exit(1)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])  # was -7: SIGBUS, no message
    assert res.stdout.startswith(f"ERROR: {root}/data.mdb is 8,192 bytes but its database uses ")
    assert "truncated" in res.stdout and len(res.stdout.splitlines()) == 1


# ---- 19. a 32-bit float TIFF ---------------------------------------------------------------------

def test_a_float_tiff_is_scaled_not_trained_black(tmp_path):
    from inputs.images import DataError, load_rgb
    values = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (32, 48, 3) and rgb.min() == 0 and rgb.max() == 255
    assert np.abs(rgb[..., 0].astype(int) - np.round(values * 255)).max() <= 1
    Image.fromarray(values * 40000, mode="F").save(path)  # a 16-bit range, as the 16-bit path scales it
    assert np.abs(np.asarray(load_rgb(str(path)))[..., 0] - np.round(values * 40000 / 257)).max() <= 1
    values[3, 4] = np.nan
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(DataError, match=r"float\.tif is a 32-bit float image with values that are not finite"):
        load_rgb(str(path))


# ---- 18. a mask-generation claim held by a reused pid --------------------------------------------

def test_a_claim_of_a_reused_pid_is_taken_over(tmp_path):
    import socket

    from run import claims
    output = str(tmp_path / "x.json")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # the pid runs, but it is another process than the one that claimed (its start time differs)
        with open(claims.claim_path(output), "w") as f:
            f.write(f"{socket.gethostname()} {live.pid} 00000000-0000-0000-0000-000000000000:1\n")
        assert not claims.claim_is_live(claims.claim_path(output))
        assert claims.try_claim(output)
        claims.release(output)
        # the process that claimed still runs: its claim holds
        with open(claims.claim_path(output), "w") as f:
            f.write(f"{socket.gethostname()} {live.pid} {claims.process_start(live.pid)}\n")
        assert claims.claim_is_live(claims.claim_path(output)) and not claims.try_claim(output)
    finally:
        live.kill()
        live.wait()
    assert claims.try_claim(output)  # its process is gone
    assert open(claims.claim_path(output)).read().split()[1:] == [str(os.getpid()), claims.process_start(os.getpid())]
    claims.release(output)


# ---- 20. staleness by ctime, which touch -d cannot set back ---------------------------------------

def test_a_mask_edited_in_place_and_dated_back_makes_the_cache_stale(toy_root, tmp_path):
    from sam.files import MaskFileError, load_annotations
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    rels = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0).rel_paths
    build_mask_cache(str(root), rels, 30.0)
    edited = root / "masks" / rels[3].replace(".png", ".json")
    folder_times, file_times = os.stat(edited.parent), os.stat(edited)
    anns = load_annotations(str(edited))
    anns[0]["segmentation"], anns[1]["segmentation"] = anns[1]["segmentation"], anns[0]["segmentation"]
    text = json.dumps({"annotations": anns})
    text += " " * (file_times.st_size - len(text))
    assert len(text) == file_times.st_size
    with open(edited, "r+") as f:  # in place, the same size, then dated back as touch -d does
        f.write(text)
    os.utime(edited, ns=(file_times.st_atime_ns, file_times.st_mtime_ns))
    os.utime(edited.parent, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    with pytest.raises(MaskFileError, match=rf"older than 1 mask file\(s\) .*{edited.name}"):
        SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30.0)


def test_a_tar_rewritten_to_the_same_size_and_dated_back_is_counted_again(tmp_path):
    from inputs.shards import shard_counts
    folder = tmp_path / "sa1b"
    folder.mkdir()
    tar = write_tar(folder / "a.tar", [member(f"{i}.png", png_bytes()) for i in range(3)])
    assert shard_counts([tar])[0] == [3]
    st = os.stat(tar)
    with open(tar, "r+b") as f:  # two samples now, the same size
        f.write(b"".join(member(f"{i}.png", png_bytes()) for i in range(2)) + b"\0" * 1024)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tar).st_size == st.st_size and os.stat(tar).st_mtime_ns == st.st_mtime_ns
    assert shard_counts([tar])[0] == [2]


# ---- 27. loader workers do not copy the parent's heap --------------------------------------------

def private_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


class GrowthProbe(torch.utils.data.Dataset):
    """A worker's private memory at its first and last sample; in between, the full collection
    that the mask path's allocations set off in a worker sooner or later (gc.collect: at once)."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n
        self.kib = torch.multiprocessing.Array("q", 2)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == 0:
            self.kib[0] = private_kib()
        sample = self.inner[i % len(self.inner)]
        if i == self.n // 2:
            gc.collect()
        if i == self.n - 1:
            self.kib[1] = private_kib()
        return sample

    def growth_mib(self) -> float:
        return (self.kib[1] - self.kib[0]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads Linux's /proc")
def test_loader_workers_do_not_copy_the_parents_heap(toy_root):
    from inputs.pretrain import build_pretrain_dataset, build_pretrain_transform, collate_pretrain, loader_options
    dataset = build_pretrain_dataset(toy_root, build_pretrain_transform(32), with_masks=True)
    gc.unfreeze()  # as the process was before any loader of another test froze it
    try:
        growth = {}
        for frozen in (False, True):
            probe = GrowthProbe(dataset, 64)
            options = loader_options(1) if frozen else {"num_workers": 1}
            for _ in torch.utils.data.DataLoader(probe, batch_size=16, collate_fn=collate_pretrain, **options):
                pass
            growth[frozen] = probe.growth_mib()
    finally:
        gc.unfreeze()
    # measured: about 100 MiB without (this process's heap, copied page by page), 12 with
    assert growth[False] > 40 and growth[True] < growth[False] / 3, growth
