"""tools/: mask generation (superpixels, SAM with a stand-in), the dataset checker, visualisation."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
from conftest import METHODS
from sam.files import decode_segmentation, encode_segmentation, load_annotations
from tools import check_dataset, generate_masks, visualize


@pytest.fixture
def images_only(toy_root, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(os.path.join(toy_root, "train"), root / "train")
    return str(root)


def test_superpixels_backend_writes_valid_varied_masks(images_only):
    summary = generate_masks.generate(images_only, generate_masks.superpixel_backend, workers=2, log_every=0)
    assert summary["images"] == 32 and summary["generated"] == 32 and not summary["failed"]
    assert summary["masks_per_image"] > 5
    files = glob.glob(os.path.join(images_only, "masks", "*", "*.json"))
    assert len(files) == 32
    data = json.load(open(files[0]))
    assert data["image"]["height"] == 32 and data["image"]["width"] == 32
    areas = [a["area"] for a in data["annotations"]]
    assert min(areas) < 0.2 * 1024 and max(areas) > 0.3 * 1024  # small parts and large regions
    for a in data["annotations"]:
        assert decode_segmentation(a["segmentation"]).sum() == a["area"]
    assert sum(summary["coverage_histogram"].values()) == pytest.approx(summary["masks_per_image"] * 32)


class StandInSam:
    """Has SamAutomaticMaskGenerator's generate(); returns two coco_rle records and one binary mask."""
    calls = 0

    def generate(self, img):
        StandInSam.calls += 1
        h, w = img.shape[:2]
        left = np.zeros((h, w), np.uint8)
        left[:, : w // 2] = 1
        top = np.zeros((h, w), np.uint8)
        top[: h // 4] = 1
        return [{"segmentation": encode_segmentation(left), "area": int(left.sum()), "bbox": [0, 0, w // 2, h],
                 "predicted_iou": 0.95, "stability_score": 0.97},
                {"segmentation": encode_segmentation(top), "area": int(top.sum()), "predicted_iou": 0.9},
                {"segmentation": np.ones((h, w), bool), "area": h * w}]


def test_sam_backend_with_a_stand_in_and_resumability(images_only):
    factory = lambda: generate_masks.SamBackend(generator=StandInSam())  # noqa: E731
    StandInSam.calls = 0
    generate_masks.generate(images_only, factory, workers=1, log_every=0)
    assert StandInSam.calls == 32
    path = glob.glob(os.path.join(images_only, "masks", "discs", "*.json"))[0]
    anns = load_annotations(path)
    assert [a["area"] for a in anns] == [512, 256, 1024] and anns[0]["stability_score"] == 0.97
    assert isinstance(anns[2]["segmentation"]["counts"], str)  # binary masks are stored as RLE
    # a second run does nothing; a damaged file is made again, alone
    StandInSam.calls = 0
    again = generate_masks.generate(images_only, factory, workers=1, log_every=0)
    assert StandInSam.calls == 0 and again["skipped_existing"] == 32
    open(path, "w").write("{broken")
    generate_masks.generate(images_only, factory, workers=1, log_every=0)
    assert StandInSam.calls == 1 and len(load_annotations(path)) == 3
    # sharding over ranks covers every image once
    shards = [generate_masks.list_images(os.path.join(images_only, "train"))[r::3] for r in range(3)]
    assert sorted(sum(shards, [])) == generate_masks.list_images(os.path.join(images_only, "train"))


def test_sam_backend_without_the_package_says_how_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError())
                        if name.startswith("segment_anything") else real_import(name, *a, **k))
    with pytest.raises(SystemExit, match="pip install segment-anything"):
        generate_masks.SamBackend(checkpoint="x.pth")


def test_checker_catches_each_planted_problem(toy_root, tmp_path, capsys):
    assert check_dataset.main(["--data_path", toy_root, "--workers", "1"]) == 0
    root = tmp_path / "planted"
    shutil.copytree(toy_root, root)
    with open(root / "train" / "discs" / "discs_train_0001.png", "r+b") as f:
        f.truncate(40)  # does not decode
    os.remove(root / "masks" / "boxes" / "boxes_train_0002.json")  # missing mask
    (root / "masks" / "stripes" / "stripes_train_0003.json").write_text("[{")  # does not parse
    m = np.ones((16, 24), np.uint8)  # wrong size: another aspect ratio
    (root / "masks" / "triangles" / "triangles_train_0004.json").write_text(
        json.dumps([{"segmentation": encode_segmentation(m), "area": 384}]))
    m = np.ones((16, 16), np.uint8)  # a mask made on a half-size copy: resized, accepted
    (root / "masks" / "triangles" / "triangles_train_0005.json").write_text(
        json.dumps([{"segmentation": encode_segmentation(m), "area": 256}]))
    capsys.readouterr()
    assert check_dataset.main(["--data_path", str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "discs_train_0001.png: image does not decode" in out
    assert "boxes_train_0002.json" in out and "no mask file" in out
    assert "stripes_train_0003.json" in out and "does not parse" in out
    assert "triangles_train_0004.png: " in out and "the mask is 24x16 but its image is 32x32" in out
    assert "triangles_train_0005" not in out.split("problems:")[1]
    assert "1 masks were made at another resolution" in out
    assert "have an annotation within +-5 points of 50% coverage" in out


@pytest.mark.parametrize("method", METHODS)
def test_visualize_writes_grids_for_each_method(pretrained, toy_root, tmp_path, method):
    out = visualize.main(["--checkpoint", pretrained[method], "--data_path", toy_root, "--num", "2",
                          "--out", str(tmp_path)])
    assert len(out) == 2
    with Image.open(out[0]) as im:
        im.verify()
    with Image.open(out[0]) as im:
        grey = np.asarray(im.convert("L"))
    assert grey.shape[0] >= 224 + 10 and grey.shape[1] >= 5 * 224  # five panels of >= 224 px, titles above
    assert (grey[:grey.shape[0] - 224 - 4] < 100).any()  # the column titles are drawn


def test_visualize_an_official_encoder_checkpoint(tmp_path):
    import models_vit
    vit = models_vit.vit_tiny_patch8(img_size=32, num_classes=0)
    torch.save({"model": vit.state_dict()}, tmp_path / "official.pth")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), np.uint8)).save(tmp_path / "a.jpg")
    with pytest.raises(SystemExit, match="pass --model"):
        visualize.main(["--checkpoint", str(tmp_path / "official.pth"), "--images", str(tmp_path / "a.jpg")])
    out = visualize.main(["--checkpoint", str(tmp_path / "official.pth"), "--model", "mae_vit_tiny_patch8",
                          "--input_size", "32", "--images", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "v")])
    with Image.open(out[0]) as im:
        assert im.size[0] >= 5 * 224 and im.size[1] >= 224


def test_pretraining_logs_a_reconstruction_grid(toy_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                       "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "0", "--num_workers", "0",
                       "--device", "cpu", "--mask_method", "segments", "--vis_freq", "2",
                       "--output_dir", str(out), "--log_dir", str(out)])
    ea = EventAccumulator(glob.glob(str(out / "events*"))[0])
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/hidden_fraction", "train/img_per_sec", "train/empty_segments"} <= scalars
    hidden = [e.value for e in ea.Scalars("train/hidden_fraction")]
    assert hidden and all(0 < v < 1 for v in hidden)
    images = ea.Images("train/reconstructions")
    assert [e.step for e in images] == [1] and images[0].width >= 5 * 224 and images[0].height >= 4 * 224


def test_throughput_tool_runs_on_cpu(tmp_path):
    from perf import throughput
    rows = throughput.main(["--model", "mae_vit_tiny_patch8", "--input_size", "32", "--batch_size", "4",
                            "--device", "cpu", "--warmup", "1", "--iters", "2", "--mask_method", "four_channels",
                            "--grad_checkpointing", "--json", str(tmp_path / "t.json")])
    ours = rows[0]
    assert ours["img_per_sec"] > 0 and ours["tflops"] > 0
    # forward + backward of a tiny ViT on 16 patches: a few hundred MFLOP per image
    assert 0.05 < ours["gflop_per_img"] < 5
    assert json.load(open(tmp_path / "t.json"))["results"][0]["name"] == "ours"


def test_mask_cache_serves_the_same_segments_as_the_json_files(toy_root, tmp_path):
    from inputs.pretrain import SegmentMaskImageFolder
    from tools import build_mask_cache
    root = tmp_path / "cached"
    shutil.copytree(toy_root, root)
    plain = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30)
    expected = [plain[i][1] for i in range(len(plain))]
    build_mask_cache.main(["--data_path", str(root), "--coverage_ratio", "30"])
    cached = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=30)
    assert cached.cache is not None
    # the JSON files are no longer read: break them all
    for f in glob.glob(str(root / "masks" / "*" / "*.json")):
        open(f, "w").write("{broken")
    for i in range(len(cached)):
        assert np.array_equal(cached[i][1], expected[i])
    # another coverage ratio has no cache and falls back to the (now broken) JSON files
    other = SegmentMaskImageFolder(str(root), with_masks=True, coverage_ratio=60)
    assert other.cache is None
    with pytest.raises(Exception, match="broken|cannot read"):
        other[0]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_loader_throughput_tool(toy_root, backend):
    from perf import loader_throughput
    r = loader_throughput.main(["--data_path", toy_root, "--input_size", "32", "--batch_size", "8",
                                "--num_workers", "1", "--steps", "6", "--device", "cpu", "--data_backend", backend])
    assert r["samples_per_sec"] > 0 and r["steps"] == 6 and r["data_backend"] == backend


@pytest.mark.slow
def test_perf_report_smoke_writes_every_part(tmp_path):
    from perf import perf_report
    report = perf_report.main(["--out", str(tmp_path), "--smoke", "--num_workers", "1"])
    assert set(report) == {"ablation_b", "ablation_l", "methods", "memory", "loader"}
    assert "+ fused attention (SDPA)" in open(tmp_path / "ablation_b.md").read()
    assert "| mae_vit_tiny_patch8 | four_channels | ours |" in open(tmp_path / "methods.md").read()
    assert [r["rows"][0]["max_batch"] for r in report["memory"]] == [8]
    assert [(r["data_backend"], r["mask_method"]) for r in report["loader"]] == [
        ("cpu", "patches"), ("cpu", "four_channels"), ("gpu", "patches"), ("gpu", "four_channels")]
    assert all(r["samples_per_sec"] > 0 for r in report["loader"])
    assert json.load(open(tmp_path / "loader.json"))[0]["steps"] == 2
    with pytest.raises(SystemExit):
        perf_report.main(["--out", str(tmp_path), "--parts", "speed_of_light"])


def test_visualized_mask_lines_up_with_the_image_as_in_training():
    """A 500x375 picture whose bright part is its mask: after the same resize and crop, the mask
    panel and the picture agree pixel for pixel (rounding the long side instead of truncating, as
    torchvision does, shifted it by one pixel)."""
    from inputs.classification import build_eval_transform
    h, w = 375, 500
    mask = np.zeros((h, w), np.uint8)
    mask[:, 185:] = 1  # a vertical edge (where rounding the long side shifted the old mask by one column)
    picture = Image.fromarray(np.where(mask[..., None] > 0, 255, 0).astype(np.uint8).repeat(3, 2))
    x = build_eval_transform(224, crop_pct=1.0)(picture)
    bright = (x[0] > 0).numpy().astype(np.uint8)
    assert np.array_equal(visualize.to_mask(Image.fromarray(mask), 224), bright)
