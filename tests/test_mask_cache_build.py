"""The mask cache builder: parallel parts give the same cache as one process, a killed build
resumes from its finished parts (rebuilding only what is missing or whose masks changed) and leaves
no temporary files, and progress reports images/s and an ETA."""
import glob
import io
import os
import shutil
import time

import numpy as np
import pytest

from inputs.folders import list_images
from sam import cache as mask_cache_build
from sam.cache import MaskCache, Progress, build_mask_cache, mask_cache_paths


@pytest.fixture
def root(toy_root, tmp_path, monkeypatch):
    monkeypatch.setattr(mask_cache_build, "PART_IMAGES", 5)  # the toy tree's 32 images make 7 parts
    copy = tmp_path / "toy"
    shutil.copytree(toy_root, copy)
    return str(copy)


def cache_arrays(root: str) -> dict:
    bin_path, index_path = mask_cache_paths(root, 50.0)
    with np.load(index_path) as index:
        arrays = {k: index[k] for k in index.files}
    arrays["bin"] = open(bin_path, "rb").read()
    return arrays


def assert_same_cache(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_parallel_build_is_the_same_cache_as_one_process(root, tmp_path):
    images = list_images(os.path.join(root, "train"))
    build_mask_cache(root, images, 50.0, workers=1)
    one = cache_arrays(root)
    assert len(one["keys"]) == 32 and (one["length"] > 0).any()
    shutil.rmtree(os.path.join(root, "masks_cache"))
    build_mask_cache(root, images, 50.0, workers=3)
    assert_same_cache(one, cache_arrays(root))
    leftovers = sorted(os.listdir(os.path.join(root, "masks_cache")))
    assert leftovers == [".lock", "coverage_50.bin", "coverage_50.npz"]  # no parts folder, no temp files
    MaskCache(root, 50.0)  # and it loads


def test_a_killed_build_resumes_from_its_finished_parts(root, monkeypatch):
    images = list_images(os.path.join(root, "train"))
    reference_root = root + "_reference"
    shutil.copytree(root, reference_root)
    build_mask_cache(reference_root, images, 50.0)
    expected = cache_arrays(reference_root)

    real_entry = mask_cache_build.cache_entry
    built = []

    def dies_at_image_17(source, rel, coverage_ratio, image_path):
        if len(built) == 17:
            raise KeyboardInterrupt  # the process is stopped mid-part
        built.append(rel)
        return real_entry(source, rel, coverage_ratio, image_path)

    monkeypatch.setattr(mask_cache_build, "cache_entry", dies_at_image_17)
    with pytest.raises(KeyboardInterrupt):
        build_mask_cache(root, images, 50.0)
    bin_path, index_path = mask_cache_paths(root, 50.0)
    parts_dir = os.path.splitext(bin_path)[0] + ".parts"
    assert not os.path.exists(index_path)  # no cache yet: training would not pick up a half build
    assert sorted(os.listdir(parts_dir)) == ["part-000000.npz", "part-000001.npz", "part-000002.npz", "plan.json"]
    open(os.path.join(parts_dir, ".part-000003.npz.tmp99999"), "wb").write(b"half")  # a writer killed mid-write
    # the masks of part 1 change while the build is stopped: that part is built again
    first_of_part_1 = sorted(images)[5]
    mask = os.path.join(root, "masks", os.path.splitext(first_of_part_1)[0] + ".json")
    os.utime(mask, ns=(time.time_ns(), time.time_ns() + 10 ** 9))

    built.clear()
    monkeypatch.setattr(mask_cache_build, "cache_entry", lambda *a: built.append(a[1]) or real_entry(*a))
    build_mask_cache(root, images, 50.0)
    keys = sorted(images)
    assert built == keys[5:10] + keys[15:]  # part 1 (changed) and parts 3 to 6 (never finished)
    resumed = cache_arrays(root)
    assert np.array_equal(resumed.pop("mask_mtime_ns")[5], os.stat(mask).st_mtime_ns)
    expected.pop("mask_mtime_ns")
    assert_same_cache(expected, resumed)
    assert sorted(os.listdir(os.path.dirname(bin_path))) == [".lock", "coverage_50.bin", "coverage_50.npz"]
    MaskCache(root, 50.0)  # not stale: every part records its masks' current dates


def test_parts_of_another_build_are_not_reused(root, monkeypatch):
    images = sorted(list_images(os.path.join(root, "train")))
    real_entry = mask_cache_build.cache_entry
    calls = []

    def stops_after_first_part(*a):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(a[1])
        return real_entry(*a)

    monkeypatch.setattr(mask_cache_build, "cache_entry", stops_after_first_part)
    with pytest.raises(KeyboardInterrupt):
        build_mask_cache(root, images, 50.0)
    calls.clear()
    monkeypatch.setattr(mask_cache_build, "cache_entry", lambda *a: calls.append(a[1]) or real_entry(*a))
    build_mask_cache(root, images[1:], 50.0)  # another image list: the old parts are dropped
    assert calls == images[1:]
    assert list(cache_arrays(root)["keys"]) == images[1:]


def test_a_bad_mask_file_in_a_worker_names_the_file_and_keeps_the_finished_parts(root):
    from sam.files import MaskFileError
    images = sorted(list_images(os.path.join(root, "train")))
    bad = os.path.join(root, "masks", os.path.splitext(images[-1])[0] + ".json")
    open(bad, "w").write("{broken")
    with pytest.raises(MaskFileError, match=os.path.basename(bad)):
        build_mask_cache(root, images, 50.0, workers=2)
    parts = glob.glob(os.path.join(mask_cache_paths(root, 50.0)[0][:-4] + ".parts", "part-*.npz"))
    assert len(parts) >= 1 and not glob.glob(os.path.join(root, "masks_cache", "**", ".*tmp*"), recursive=True)


def test_progress_reports_rate_and_eta():
    out = io.StringIO()
    progress = Progress(100, "mask cache", every=0.0, stream=out)
    progress.start -= 10  # 10 s ago
    progress.update(50, built=True)
    progress.update(50, built=True)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("mask cache: 50/100 images (50.0%), 5 images/s, ETA 00:00:")
    assert lines[-1].startswith("mask cache: 100/100 images (100.0%)") and "ETA 00:00:00" in lines[-1]
    resumed = Progress(100, "mask cache", every=0.0, stream=out)
    resumed.update(40, built=False)  # kept parts: no rate to speak of yet
    assert out.getvalue().splitlines()[-1].endswith("0 images/s, ETA -")


def test_cli_rejects_zero_workers(toy_root, capsys):
    from tools import build_mask_cache as tool
    with pytest.raises(SystemExit):
        tool.main(["--data_path", str(toy_root), "--workers", "0"])
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_bench_tool_builds_with_each_worker_count(tmp_path, monkeypatch):
    from perf import bench_mask_cache
    monkeypatch.setattr(mask_cache_build, "PART_IMAGES", 4)
    rows = bench_mask_cache.main(["--images", "12", "--annotations", "5", "--workers", "1", "2",
                                  "--root", str(tmp_path / "bench")])
    assert [r["workers"] for r in rows] == [1, 2] and all(r["images"] == 12 and r["images_per_s"] > 0 for r in rows)
    cache = MaskCache(str(tmp_path / "bench"), 50.0)
    assert (cache.length > 0).all()  # every file has annotations, so every image has a chosen segment
