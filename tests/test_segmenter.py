"""Segmenter: model shapes, sliding windows, augmentation, metrics, training, data preparation."""
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

import segmenter.train as seg_train
from conftest import METHODS
from models_vit import AdaptationError, load_pretrained_encoder
from segmenter import prepare_ade20k
from segmenter.data import ADE20K, IGNORE_INDEX, SegEvalTransform, SegTrainTransform, reduce_zero_label
from segmenter.inference import sliding_window_logits, window_starts
from segmenter.metrics import ConfusionMatrix
from segmenter.model import build_segmenter


def seg_model(decoder="linear", channels=3, crop=32):
    torch.manual_seed(0)
    return build_segmenter("vit_tiny_patch8", decoder, 150, crop, channels).eval()


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
@pytest.mark.parametrize("channels", [3, 4])
def test_output_shapes(decoder, channels):
    model = seg_model(decoder, channels)
    assert model.encoder.patch_embed.proj.in_channels == channels
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 150, 32, 32)
        # rectangular, not a multiple of the patch size, larger than the crop: padded and resampled
        assert model(torch.randn(1, 3, 40, 70)).shape == (1, 150, 40, 70)


def test_mask_transformer_structure():
    model = seg_model("mask_transformer")
    dec = model.decoder
    assert len(dec.blocks) == 2 and dec.cls_emb.shape == (1, 150, 192)
    assert dec.mask_norm.normalized_shape == (150,)


def test_sliding_window_equals_single_forward_when_the_window_covers_the_image():
    model = seg_model("mask_transformer")
    img = torch.randn(3, 32, 48)
    with torch.no_grad():
        direct = model(img[None, :, :, :32])[0]
    whole = sliding_window_logits(model, img[:, :, :32], 150, window_size=32, window_stride=32)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-6)
    logits = sliding_window_logits(model, img, 150, window_size=32, window_stride=16)
    assert logits.shape == (150, 32, 48)
    assert window_starts(48, 32, 16) == [0, 16] and window_starts(50, 32, 16) == [0, 16, 18]
    assert window_starts(20, 32, 16) == [0]


def test_sliding_window_averages_overlapping_logits():
    class Ramp(torch.nn.Module):
        """Logits that make class 0 certain in the left half of every window, class 1 in the right."""
        def forward(self, x):
            out = torch.full((x.shape[0], 2, *x.shape[-2:]), -50.0)
            out[:, 0, :, : x.shape[-1] // 2] = 50
            out[:, 1, :, x.shape[-1] // 2:] = 50
            return out

    logits = sliding_window_logits(Ramp(), torch.zeros(3, 8, 12), 2, window_size=8, window_stride=4)
    # columns 4-7 are seen by both windows: once as right half (-50), once as left half (+50)
    torch.testing.assert_close(logits[0, 0], torch.tensor([50.] * 4 + [0.] * 4 + [-50.] * 4))


def test_reduce_zero_label():
    assert reduce_zero_label(np.array([0, 1, 150, 7])).tolist() == [255, 0, 149, 6]


def coloured_pair(h=60, w=90, seed=0):
    label = np.full((h, w), 4, np.uint8)
    label[10:40, 5:50] = 7
    label[30:58, 55:88] = 2
    label[:, :3] = IGNORE_INDEX
    palette = {4: (200, 10, 10), 7: (10, 200, 10), 2: (10, 10, 200), IGNORE_INDEX: (0, 0, 0)}
    img = np.zeros((h, w, 3), np.uint8)
    for k, c in palette.items():
        img[label == k] = c
    return (tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(label)[None]),
            palette)


def test_train_augmentation_keeps_image_and_label_aligned_and_invents_no_label():
    img, label, palette = coloured_pair()
    t = SegTrainTransform(48, base_scale=(180, 60), photometric=False)
    for seed in range(20):
        x, y = t(img, label, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 48, 48) and y.shape == (1, 48, 48)
        assert set(y.unique().tolist()) <= {2, 4, 7, IGNORE_INDEX}  # nearest: no new label values
        # undo the normalisation and read each labelled pixel's colour back
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        rgb = ((x * std + mean) * 255).round()
        # pixels whose 3x3 neighbourhood has one label (bilinear resizing blends colours at edges)
        yf = y.float()[None]
        interior = (torch.nn.functional.max_pool2d(yf, 3, 1, 1) == -torch.nn.functional.max_pool2d(-yf, 3, 1, 1))[0, 0]
        interior[[0, -1]] = False  # at the crop's edge the neighbour that decides the colour is cut off
        interior[:, [0, -1]] = False
        agree = total = 0
        for k in (2, 4, 7):
            where = (y[0] == k) & interior
            colour = torch.tensor(palette[k], dtype=torch.float32)[:, None]
            agree += ((rgb[:, where] - colour).abs().max(0).values < 60).sum().item()
            total += where.sum().item()
        assert total > 0 and agree / total > 0.99, (seed, agree / total)
    # photometric distortion changes colours but never labels or geometry
    x1, y1 = SegTrainTransform(48, base_scale=(180, 60))(img, label, torch.Generator().manual_seed(3))
    x2, y2 = t(img, label, torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)


def test_padding_uses_the_ignore_label():
    img, label, _ = coloured_pair(20, 30)
    x, y = SegTrainTransform(64, base_scale=(30, 20), ratio_range=(1.0, 1.0))(img, label, torch.Generator())
    assert x.shape == (3, 64, 64) and (y[0, 20:] == IGNORE_INDEX).all() and (y[0, :, 30:] == IGNORE_INDEX).all()


def test_eval_transform_resizes_short_side_and_keeps_the_label():
    img, label, _ = coloured_pair(60, 90)
    x, y = SegEvalTransform(32)(img, label)
    assert x.shape == (3, 32, 48) and torch.equal(y, label)


def test_confusion_matrix_metrics_match_numpy():
    rng = np.random.RandomState(0)
    n_cls = 6
    gt = rng.randint(0, 5, size=(4, 30, 30))  # class 5 never in the ground truth ...
    pred = rng.randint(0, 4, size=(4, 30, 30))  # ... nor predicted; class 4 only in the ground truth
    gt[:, :5] = IGNORE_INDEX
    cm = ConfusionMatrix(n_cls)
    for g, p in zip(gt, pred):
        cm.update(torch.from_numpy(p), torch.from_numpy(g))
    m = cm.compute()
    valid = gt != IGNORE_INDEX
    ious, accs = [], []
    for c in range(n_cls):
        inter = np.sum((gt == c) & (pred == c) & valid)
        union = np.sum(((gt == c) | (pred == c)) & valid)
        if union > 0:
            ious.append(inter / union)
        if np.sum((gt == c) & valid) > 0:
            accs.append(inter / np.sum((gt == c) & valid))
    assert m["per_class_iou"][5] is None and m["per_class_iou"][4] == 0.0
    assert m["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert m["pixel_accuracy"] == pytest.approx(100 * np.mean(gt[valid] == pred[valid]))
    assert m["mean_class_accuracy"] == pytest.approx(100 * np.mean(accs))


def test_ade20k_dataset(toy_ade20k):
    ds = ADE20K(toy_ade20k, "train", SegTrainTransform(32))
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and label.shape == (32, 32) and label.dtype == torch.int64
    present = set(label.unique().tolist())
    assert present <= {0, 2, 4, 12, 20, 39, IGNORE_INDEX}  # toy labels 1,3,5,13,21,40 reduced by one
    val = ADE20K(toy_ade20k, "val", SegEvalTransform(32))
    img, label = val[1]
    assert min(img.shape[-2:]) == 32 and label.shape in [(64, 96), (96, 64)]


def test_each_methods_checkpoint_loads(pretrained):
    for method in METHODS:
        model = build_segmenter("vit_tiny_patch8", "linear", 150, 48, channels=3)
        _, missing, unexpected = load_pretrained_encoder(model.encoder, pretrained[method])
        assert missing == [] and unexpected == []
        assert model.encoder.pos_embed.shape[1] == 1 + 36  # resized from 4x4 to the 6x6 crop grid
    model4 = build_segmenter("vit_tiny_patch8", "mask_transformer", 150, 32, channels=4)
    load_pretrained_encoder(model4.encoder, pretrained["four_channels"], fold_mask_channel=False)
    sd = torch.load(pretrained["four_channels"], weights_only=True)["model"]
    assert torch.equal(model4.encoder.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    with pytest.raises(AdaptationError, match="3 input channels"):
        load_pretrained_encoder(build_segmenter("vit_tiny_patch8", "linear", 150, 32, 4).encoder,
                                pretrained["segments"], fold_mask_channel=False)


def seg_args(toy_ade20k, log_dir, *extra):
    return ["--dataset-dir", toy_ade20k, "--log-dir", str(log_dir), "--backbone", "vit_tiny_patch8",
            "--decoder", "linear", "--crop-size", "32", "--batch-size", "8", "--lr", "0.01",
            "--num-workers", "0", "--device", "cpu", "--print-freq", "5", *extra]


@pytest.mark.slow
def test_training_lifts_miou_well_above_chance(toy_ade20k, pretrained, tmp_path):
    before = seg_train.cli(seg_args(toy_ade20k, tmp_path / "before", "--mae-chp", pretrained["patches"],
                                    "--eval-only"))
    after = seg_train.cli(seg_args(toy_ade20k, tmp_path / "run", "--mae-chp", pretrained["patches"],
                                   "--epochs", "10", "--eval-freq", "5"))
    assert after["mIoU"] > 35.0 and after["mIoU"] > before["mIoU"] + 25.0, (before["mIoU"], after["mIoU"])
    assert after["pixel_accuracy"] > 60.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(10)) and "mIoU" in lines[4] and "mIoU" in lines[9]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["epoch"] == 9 and len(saved["per_class_iou"]) == 150
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run"))


def test_training_resumes_from_its_checkpoint(toy_ade20k, pretrained, tmp_path, capsys):
    args = seg_args(toy_ade20k, tmp_path / "r", "--mae-chp", pretrained["four_channels"], "--channels", "4",
                    "--decoder", "mask_transformer", "--eval-freq", "1")
    seg_train.cli(args + ["--epochs", "1"])
    first = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=True)
    assert first["epoch"] == 0 and first["args"].mask_method == "four_channels"
    seg_train.cli(args + ["--epochs", "2"])
    assert "Resumed from" in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "r" / "log.txt").read_text().splitlines()) == 2


def test_bad_dataset_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        seg_train.cli(["--dataset-dir", str(tmp_path), "--log-dir", str(tmp_path / "l"), "--device", "cpu"])
    assert exc.value.code == 1 and "prepare_ade20k" in capsys.readouterr().err


def make_zip(tmp_path):
    src = tmp_path / "src" / "ADEChallengeData2016"
    for d in prepare_ade20k.REQUIRED:
        (src / d).mkdir(parents=True)
        (src / d / "ADE_x.png").write_bytes(b"x")
    archive = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for root, _, files in os.walk(tmp_path / "src"):
            for f in files:
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, tmp_path / "src"))
    return archive, hashlib.sha1(archive.read_bytes()).hexdigest()


def test_prepare_ade20k_downloads_checks_and_unpacks(tmp_path, monkeypatch):
    archive, sha1 = make_zip(tmp_path)
    out = tmp_path / "data"
    root = prepare_ade20k.prepare(str(out), url=archive.as_uri(), sha1=sha1)
    assert prepare_ade20k.is_complete(root) and not (out / "ADEChallengeData2016.zip").exists()
    # present: nothing is downloaded again
    monkeypatch.setattr(prepare_ade20k, "download", lambda *a: pytest.fail("downloaded again"))
    assert prepare_ade20k.prepare(str(out), url=archive.as_uri(), sha1=sha1) == root
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="checksum mismatch"):
        prepare_ade20k.prepare(str(tmp_path / "other"), url=archive.as_uri(), sha1="0" * 40)
    assert (tmp_path / "other" / "ADEChallengeData2016.zip.bad").exists()
    assert not (tmp_path / "other" / "ADEChallengeData2016").exists()


def test_prepare_ade20k_without_network(tmp_path, monkeypatch):
    import urllib.error
    archive, sha1 = make_zip(tmp_path)

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(prepare_ade20k.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="cannot download .*--zip PATH"):
        prepare_ade20k.prepare(str(tmp_path / "a"))
    root = prepare_ade20k.main(["--out", str(tmp_path / "b"), "--zip", str(archive), "--sha1", sha1])
    assert prepare_ade20k.is_complete(str(tmp_path / "b" / "ADEChallengeData2016")) and archive.exists()
    prepare_ade20k.main(["--out", str(tmp_path / "c"), "--folder", str(tmp_path / "b" / "ADEChallengeData2016")])
    assert prepare_ade20k.is_complete(str(tmp_path / "c" / "ADEChallengeData2016"))
    assert root is None
