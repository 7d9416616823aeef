"""Every mask layout a user has: SAM's JSON, the original segmae code's table.txt + PNGs and
segment-anything's amg.py folders, read through one interface by training, the checker, the cache,
the converter and the visualiser, with the segment the original code would choose."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from test_pretrain_cli import common

import main_pretrain
from inputs.pretrain import DataError, SegmentMaskImageFolder
from sam.cache import MaskCache, build_mask_cache
from sam.files import MaskFileError, encode_segmentation, write_mask_file
from sam.layouts import SegmaeMasks, closest_larger, open_mask_source
from sam.listing import detect_format
from tools import check_dataset, convert_masks, visualize
from tools.make_toy_data import annotation, make_toy_dataset, write_amg_masks, write_segmae_masks

LAYOUTS = ["json", "segmae", "amg"]


def original_choice(coverages, ratio):
    """The original segmae code's rule, stated directly: on the table sorted by coverage, the
    largest when the ratio is at or above it, else the closest, equal distance to the larger."""
    order = sorted(range(len(coverages)), key=lambda i: coverages[i])
    if ratio >= coverages[order[-1]]:
        return order[-1]
    return min(order, key=lambda i: (abs(coverages[i] - ratio), -coverages[i]))


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


@pytest.fixture(scope="module")
def layout_roots(tmp_path_factory):
    """The same toy images and segments in each of the three layouts."""
    roots = {}
    for fmt in LAYOUTS:
        root = str(tmp_path_factory.mktemp(f"layout_{fmt}"))
        make_toy_dataset(root, train_per_class=4, val_per_class=1, height=32, width=40, seed=3, mask_format=fmt)
        roots[fmt] = root
    return roots


def test_the_original_choice_rule():
    cov = [10.0, 30.0, 50.0]
    assert closest_larger(cov, 20.0) == (1, False)  # equal distance: the larger
    assert closest_larger(cov, 40.0) == (2, False)
    assert closest_larger(cov, 33.0) == (1, False)
    assert closest_larger(cov, 90.0) == (2, False)  # above the largest: the largest
    assert closest_larger(cov, 1.0) == (0, False)
    assert closest_larger(cov, 30.0) == (1, False)
    # an unsorted table is sorted first (the original would pick by position), and said
    assert closest_larger([50.0, 10.0, 30.0], 40.0) == (0, True)
    assert closest_larger([50.0, 10.0, 30.0], 20.0) == (2, True)
    rng = np.random.RandomState(0)
    for _ in range(300):
        cov = sorted(rng.choice(np.arange(1, 60) * 1.5, size=rng.randint(1, 8), replace=False).tolist())
        ratio = float(rng.choice(np.arange(0, 100) * 0.75))
        assert closest_larger(cov, ratio)[0] == original_choice(cov, ratio)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_each_layout_is_detected_and_trains_the_same_segments(layout_roots, fmt):
    json_folder = SegmentMaskImageFolder(layout_roots["json"], with_masks=True, coverage_ratio=30.0)
    folder = SegmentMaskImageFolder(layout_roots[fmt], with_masks=True, coverage_ratio=30.0)
    assert folder.source.format == fmt and len(folder) == len(json_folder) == 16
    for i in range(len(folder)):
        _, mask, _ = folder[i]
        _, expected, _ = json_folder[i]  # the toy segments' coverages are far from ties
        assert mask.dtype == np.uint8 and np.array_equal(mask, expected)


def segmae_root(tmp_path, images, tables, empty_list=()):
    """train/c/<name> images; masks/c/<stem>/table.txt + PNGs from {name: [(coverage, mask)]}."""
    root = tmp_path / "data"
    for name, (h, w) in images.items():
        os.makedirs(root / "train" / "c", exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "train" / "c" / name)
    for name, entries in tables.items():
        write_segmae_masks(str(root / "masks" / "c" / os.path.splitext(name)[0]), [m for _, m in entries],
                           [c for c, _ in entries])
    if empty_list:
        (root / "train" / "emptyfiles.txt").write_text("\n".join(empty_list) + "\n")
    return root


def test_segmae_layout_chooses_as_the_original_and_never_transposes_square_masks(tmp_path):
    # a square image with asymmetric segments: the original transposes every square mask (a bug)
    a, b, c = rect(24, 24, 0, 6, 0, 20), rect(24, 24, 2, 20, 1, 4), rect(24, 24, 10, 24, 0, 24)
    root = segmae_root(tmp_path, {"sq.png": (24, 24)}, {"sq.png": [(10.0, a), (30.0, b), (50.0, c)]})
    for ratio, expected in ((20.0, b), (40.0, c), (5.0, a), (95.0, c), (30.0, b)):
        _, mask, _ = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=ratio)[0]
        assert np.array_equal(mask, expected), ratio


def test_unsorted_table_is_sorted_and_said_once(tmp_path, capsys):
    a, b = rect(32, 32, 0, 8, 0, 8), rect(32, 32, 0, 16, 0, 32)
    root = segmae_root(tmp_path, {f"x{i}.png": (32, 32) for i in range(8)},
                       {f"x{i}.png": [(6.25, a), (50.0, b)] for i in range(8)})
    for i in range(8):  # the larger segment first: not sorted
        (root / "masks" / "c" / f"x{i}" / "table.txt").write_text("50.0 1.png\n6.25 0.png\n")
    folder = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=45.0)
    assert np.array_equal(folder[0][1], b)
    out = tmp_path / "out"
    main_pretrain.cli(common(str(root), out, "--mask_method", "segments", "--coverage_ratio", "45", "--epochs", "2"))
    said = capsys.readouterr().out
    assert said.count("table.txt file(s) were not sorted by coverage") == 1
    assert "NOTE: 8 segmae table.txt" in said


def test_emptyfiles_list_leaves_images_out(tmp_path, capsys):
    m = rect(32, 32, 0, 16, 0, 16)
    root = segmae_root(tmp_path, {"a.png": (32, 32), "b.png": (32, 32), "c.png": (32, 32)},
                       {"a.png": [(25.0, m)], "c.png": [(25.0, m)]}, empty_list=["b.png"])
    folder = SegmentMaskImageFolder(str(root), with_masks=True)
    assert [os.path.basename(p) for p, _ in folder.samples] == ["a.png", "c.png"]
    assert "1 images of" in capsys.readouterr().out
    report = check_dataset.check(str(root))
    assert not report["problems"] and report["listed_empty"] == 1 and report["format"] == "segmae"
    # not listed and no folder: a missing mask, as in every layout
    (root / "train" / "emptyfiles.txt").write_text("")
    with pytest.raises(DataError, match=r"1 of 3 images .* no mask file \(segmae layout\)(.|\n)*masks/c/b"):
        SegmentMaskImageFolder(str(root), with_masks=True)


def test_nonbinary_pngs_are_thresholded_at_128_and_counted(tmp_path, capsys):
    root = segmae_root(tmp_path, {f"x{i}.png": (32, 32) for i in range(8)}, {})
    soft = np.zeros((32, 32), np.uint8)
    soft[:, :10], soft[:, 10:20], soft[:, 20:] = 255, 129, 127  # an antialiased edge
    for i in range(8):
        folder = root / "masks" / "c" / f"x{i}"
        os.makedirs(folder)
        Image.fromarray(soft, mode="L").save(folder / "0.png")
        (folder / "table.txt").write_text("60.0 0.png\n")
    _, mask, _ = SegmentMaskImageFolder(str(root), with_masks=True)[0]
    assert np.array_equal(mask, (soft >= 128).astype(np.uint8))
    out = tmp_path / "out"
    main_pretrain.cli(common(str(root), out, "--mask_method", "segments", "--epochs", "2"))
    said = capsys.readouterr().out
    assert said.count("thresholded at 128") == 1 and "NOTE: 8 mask PNG(s) were not strictly 0/255" in said


def test_mixed_layouts_and_missing_index_files_are_named(tmp_path):
    m = rect(32, 32, 0, 16, 0, 16)
    root = segmae_root(tmp_path, {"a.png": (32, 32), "b.png": (32, 32)}, {"a.png": [(25.0, m)]})
    write_mask_file(str(root / "masks" / "c" / "b.json"), [{"segmentation": encode_segmentation(m), "area": 256}])
    with pytest.raises(MaskFileError, match=r"mixes mask layouts: json \(e.g. .*b.json\); segmae \(e.g. .*table.txt\)"):
        SegmentMaskImageFolder(str(root), with_masks=True)
    # forced, the other image is missing its masks
    with pytest.raises(DataError, match="1 of 2 images"):
        SegmentMaskImageFolder(str(root), with_masks=True, mask_format="segmae")
    # a folder of the other folder layout inside a segmae root: named at the sample
    os.remove(root / "masks" / "c" / "b.json")
    write_amg_masks(str(root / "masks" / "c" / "b"), [annotation(m, 0, np.random.RandomState(0))], [m])
    folder = SegmentMaskImageFolder(str(root), with_masks=True, mask_format="segmae")
    with pytest.raises(MaskFileError, match=r"masks/c/b/table.txt.*holds metadata.csv, which is another layout"):
        folder[1]
    # a malformed table line names the file and line
    (root / "masks" / "c" / "a" / "table.txt").write_text("25.0 0.png\nabc 1.png\n")
    with pytest.raises(MaskFileError, match=r"a/table.txt, line 2: 'abc 1.png'"):
        folder[0]


def test_detection_reads_one_folder_per_class_and_no_index(layout_roots, monkeypatch):
    opened = []
    real_open = open

    def counting_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    folder = SegmentMaskImageFolder(layout_roots["amg"], with_masks=True)
    assert len(folder) == 16
    assert not [p for p in opened if p.endswith(("metadata.csv", "table.txt", ".png"))]


@pytest.mark.parametrize("fmt", ["segmae", "amg"])
def test_check_cache_convert_and_visualise_from_folder_layouts(layout_roots, tmp_path, fmt, pretrained):
    root = str(tmp_path / "root")
    shutil.copytree(layout_roots[fmt], root)
    report = check_dataset.check(root, coverage=30.0)
    assert not report["problems"] and report["format"] == fmt and report["images"] == 16
    reference = SegmentMaskImageFolder(root, with_masks=True, coverage_ratio=30.0)
    expected = [reference[i][1] for i in range(len(reference))]

    # the compact cache holds the same segments, and is refused once a table/CSV changes
    build_mask_cache(root, reference.rel_paths, 30.0)
    cached = SegmentMaskImageFolder(root, with_masks=True, coverage_ratio=30.0)
    assert cached.cache is not None
    assert all(np.array_equal(cached[i][1], expected[i]) for i in range(len(cached)))
    index = reference.source.index_file(reference.rel_paths[0])
    with open(index, "a") as f:
        f.write("\n")
    with pytest.raises(MaskFileError, match="older than 1 mask file"):
        MaskCache(root, 30.0, reference.source)
    shutil.rmtree(os.path.join(root, "masks_cache"))

    # converted to JSON (two processes), then resumed: every file already done
    summary = convert_masks.main(["--data_path", root, "--workers", "2"])
    assert summary["converted"] == 16 and summary["error"] == 0
    again = convert_masks.main(["--data_path", root, "--workers", "1"])
    assert again["done"] == 16 and again["converted"] == 0
    data = json.load(open(os.path.join(root, "masks_json", "boxes", "boxes_train_0000.json")))
    assert data["generator"]["converted_from"] == fmt and data["image"]["height"] == 32
    os.rename(os.path.join(root, "masks"), os.path.join(root, "masks_" + fmt))
    os.rename(os.path.join(root, "masks_json"), os.path.join(root, "masks"))
    converted = SegmentMaskImageFolder(root, with_masks=True, coverage_ratio=30.0)
    assert converted.source.format == "json"
    assert all(np.array_equal(converted[i][1], expected[i]) for i in range(len(converted)))
    os.rename(os.path.join(root, "masks"), os.path.join(root, "masks_json"))
    os.rename(os.path.join(root, "masks_" + fmt), os.path.join(root, "masks"))

    # straight into the cache
    cache = convert_masks.main(["--data_path", root, "--to", "cache", "--coverage_ratio", "30"])
    assert os.path.exists(cache["cache"])
    assert SegmentMaskImageFolder(root, with_masks=True, coverage_ratio=30.0).cache is not None

    # pictures of a segment method's checkpoint, masks from this layout
    written = visualize.main(["--checkpoint", pretrained["segments"], "--data_path", root, "--num", "2",
                              "--out", str(tmp_path / "vis")])
    assert len(written) == 2 and all(os.path.getsize(p) > 0 for p in written)


def test_converted_segmae_keeps_the_original_choice_at_ties(tmp_path):
    """Equal distance goes to the larger coverage in the original; SAM's JSON rule is 'first':
    a converted file records the original's rule and coverages, so every ratio chooses alike."""
    segs = [(10.0, rect(40, 40, 0, 4, 0, 40)), (30.0, rect(40, 40, 0, 12, 0, 40)), (50.0, rect(40, 40, 0, 20, 0, 40)),
            (30.0, rect(40, 40, 28, 40, 0, 40))]
    root = segmae_root(tmp_path, {"x.png": (40, 40)}, {"x.png": segs})
    ratios = [0.0, 10.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 70.0, 100.0]
    before = {r: SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=r)[0][1] for r in ratios}
    convert_masks.main(["--data_path", str(root), "--workers", "1"])
    os.rename(root / "masks", root / "masks_segmae")
    os.rename(root / "masks_json", root / "masks")
    for r in ratios:
        after = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=r)[0][1]
        assert np.array_equal(after, before[r]), r


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["segmae", "amg"])
def test_pretraining_end_to_end_from_folder_layouts(layout_roots, tmp_path, fmt):
    for method in ("segments", "four_channels"):
        out = tmp_path / method
        main_pretrain.cli(common(layout_roots[fmt], out, "--mask_method", method, "--coverage_ratio", "30"))
        assert (out / "checkpoint-0.pth").exists()


@pytest.mark.slow
def test_real_segment_anything_output_in_amg_layout_trains(tmp_path):
    """Masks from the real segment-anything package (random weights), written as its
    scripts/amg.py writes them by default (binary_mask: <i>.png + metadata.csv)."""
    pytest.importorskip("segment_anything")
    import torch
    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    generator = SamAutomaticMaskGenerator(sam, points_per_side=2, points_per_batch=4, pred_iou_thresh=0,
                                          stability_score_thresh=0, output_mode="binary_mask")
    root = tmp_path / "data"
    os.makedirs(root / "train" / "c")
    rng = np.random.RandomState(0)
    for i in range(8):
        img = rng.randint(0, 255, (24, 40, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "train" / "c" / f"x{i}.png")
        masks = generator.generate(img) if i == 0 else []
        if i >= 1:  # one image through SAM (CPU time); the rest: SAM's output format, our segments
            seg = rect(24, 40, 0, 8 + i, 0, 20)
            masks = [{"segmentation": seg.astype(bool), "area": int(seg.sum()), "bbox": [0, 0, 20, 8 + i],
                      "point_coords": [[5.0, 3.0]], "predicted_iou": 0.9, "stability_score": 0.95,
                      "crop_box": [0, 0, 40, 24]}]
        write_amg_masks(str(root / "masks" / "c" / f"x{i}"),
                        [{k: v for k, v in m.items() if k != "segmentation"} for m in masks],
                        [m["segmentation"].astype(np.uint8) for m in masks])
    assert detect_format(str(root / "masks"), {f"c/x{i}" for i in range(8)}) == "amg"
    assert not check_dataset.check(str(root))["problems"]
    source = open_mask_source(str(root / "masks"), {"c/x0"})
    assert all(s.fields["stability_score"] >= 0 for s in source.segments("c/x0.png"))
    out = tmp_path / "out"
    main_pretrain.cli(common(str(root), out, "--mask_method", "segments"))
    assert (out / "checkpoint-0.pth").exists()


def test_segmae_source_refuses_paths_outside_its_folder(tmp_path):
    root = segmae_root(tmp_path, {"a.png": (8, 8)}, {})
    os.makedirs(root / "masks" / "c" / "a")
    (root / "masks" / "c" / "a" / "table.txt").write_text("50 ../../../secret.png\n")
    with pytest.raises(MaskFileError, match="is not a file name"):
        SegmaeMasks(str(root / "masks"), shared_counters=False).segments("c/a.png")
