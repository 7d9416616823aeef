"""SAM mask files, segment choice, joint augmentation and the pretraining dataset."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from inputs.pretrain import (DataError, PretrainDataset, PretrainTransform, SegmentMaskImageFolder,
                             build_pretrain_dataset)
from sam.files import (MaskFileError, decode_segmentation, encode_segmentation, load_annotations, load_segment,
                       select_annotation)
from tools.make_toy_data import make_toy_dataset


def ann(area, h=10, w=10, counts="not-decoded"):
    return {"segmentation": {"size": [h, w], "counts": counts}, "area": area}


# ------------------------------------------------------------------------------------------------
# choosing and decoding segments

def test_select_annotation_closest_coverage_ties_first():
    anns = [ann(10), ann(40), ann(60), ann(90)]  # coverage 10, 40, 60, 90 %
    assert select_annotation(anns, 45) is anns[1]
    assert select_annotation(anns, 85) is anns[3]
    assert select_annotation(anns, 50) is anns[1]  # 40 and 60 tie: the first wins
    assert select_annotation(anns, 100) is anns[3]
    assert select_annotation([], 50) is None
    # coverage is relative to each annotation's own size
    assert select_annotation([ann(50, 10, 10), ann(50, 20, 20)], 12.5) is not None
    assert select_annotation([ann(50, 10, 10), ann(50, 20, 20)], 12.5)["segmentation"]["size"] == [20, 20]


def test_selection_never_decodes(monkeypatch):
    """Only area and size are read: an annotation with garbage counts can still be chosen."""
    import sam.files as sm
    calls = []
    monkeypatch.setattr(sm, "decode_segmentation", lambda seg: calls.append(seg) or np.ones((10, 10), np.uint8))
    path_anns = [ann(10, counts="garbage-1"), ann(50, counts="garbage-2"), ann(90, counts="garbage-3")]
    assert select_annotation(path_anns, 55)["segmentation"]["counts"] == "garbage-2"
    assert calls == []


def test_rle_roundtrip_string_and_list_counts():
    rng = np.random.RandomState(0)
    m = (rng.rand(13, 17) > 0.6).astype(np.uint8)
    seg = encode_segmentation(m)
    assert isinstance(seg["counts"], str) and seg["size"] == [13, 17]
    assert np.array_equal(decode_segmentation(seg), m)
    # uncompressed RLE: run lengths in column-major order starting with zeros
    flat = m.flatten(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v == current:
            n += 1
        else:
            runs.append(n)
            current, n = v, 1
    runs.append(n)
    assert np.array_equal(decode_segmentation({"size": [13, 17], "counts": runs}), m)


def test_mask_file_forms_and_errors(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 1
    a = {"segmentation": encode_segmentation(m), "area": int(m.sum())}
    sa1b, bare = tmp_path / "a.json", tmp_path / "b.json"
    sa1b.write_text(json.dumps({"image": {"width": 8, "height": 8}, "annotations": [a]}))
    bare.write_text(json.dumps([a]))
    for p in (sa1b, bare):
        assert len(load_annotations(str(p))) == 1
        assert np.array_equal(load_segment(str(p), 25.0), m)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert load_segment(str(empty), 50, image_size=(5, 3)).shape == (3, 5)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MaskFileError, match="bad.json"):
        load_segment(str(bad), 50)
    with pytest.raises(MaskFileError, match="not found"):
        load_segment(str(tmp_path / "missing.json"), 50)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"segmentation": {"size": [8, 8]}}]))
    with pytest.raises(MaskFileError, match="wrong.json"):
        load_segment(str(wrong), 50)


# ------------------------------------------------------------------------------------------------
# joint augmentation

def test_transform_without_mask_is_the_reference_transform():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (50, 70, 3), dtype=np.uint8))
    reference = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    ours = PretrainTransform(32)
    for seed in range(5):
        torch.manual_seed(seed)
        a = reference(img)
        torch.manual_seed(seed)
        b = ours(img)
        assert torch.equal(a, b)


def test_mask_stays_aligned_with_image():
    """The mask is drawn from the image's own colours: after crop, resize and flip the two agree."""
    mask = np.zeros((60, 90), np.uint8)
    mask[10:45, 5:40] = 1
    mask[30:58, 55:88] = 1
    pixels = np.where(mask[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, axis=2)
    img = Image.fromarray(pixels)
    t = PretrainTransform((24, 40), scale=(0.2, 1.0))
    flips = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, m = t(img, mask)
        assert x.shape == (3, 24, 40) and m.shape == (1, 24, 40)
        assert set(m.unique().tolist()) <= {0.0, 1.0}  # nearest: still binary
        white = (x[0] > 0).float()  # normalised: 0 maps below zero, 255 above
        agreement = (white == m[0]).float().mean().item()
        assert agreement > 0.95, (seed, agreement)
        torch.manual_seed(seed)
        T.RandomResizedCrop.get_params(img, (0.2, 1.0), t.ratio)
        flips += torch.rand(1).item() < 0.5
    assert 0 < flips < 40  # both branches were exercised


# ------------------------------------------------------------------------------------------------
# the dataset

def test_dataset_items(toy_root):
    t = PretrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    folder = SegmentMaskImageFolder(toy_root, with_masks=True, coverage_ratio=30)
    assert len(folder) == 32 and folder.classes == ["boxes", "discs", "stripes", "triangles"]
    seg = PretrainDataset([folder], t)
    img, mask, target = seg[0]
    assert img.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and target == 0
    assert 0 < mask.mean() < 1
    plain = build_pretrain_dataset(toy_root, t, with_masks=False)
    img, target = plain[0]
    assert img.shape == (3, 32, 32)


def test_augmentation_is_seeded_per_sample_and_epoch(toy_root):
    ds = build_pretrain_dataset(toy_root, PretrainTransform(24), with_masks=True, seed=7)
    torch.manual_seed(0)
    a = ds[5]
    torch.manual_seed(123)  # the global generator plays no part
    b = ds[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(1)
    c = ds[5]
    assert not torch.equal(a[0], c[0])
    other_seed = build_pretrain_dataset(toy_root, PretrainTransform(24), with_masks=True, seed=8)
    assert not torch.equal(a[0], other_seed[5][0])


@pytest.mark.parametrize("coverage", [5.0, 30.0, 60.0, 95.0])
def test_dataset_serves_the_segment_closest_to_the_coverage_ratio(toy_root, coverage):
    # full-image crop at the native 32x32 size: the served mask is the decoded annotation itself
    t = PretrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    ds = PretrainDataset([SegmentMaskImageFolder(toy_root, with_masks=True, coverage_ratio=coverage)], t)
    for i in range(0, 32, 5):
        folder = ds.folders[0]
        path, _ = folder.samples[i]
        anns = load_annotations(folder.mask_root + path[len(folder.image_root):].rsplit(".", 1)[0] + ".json")
        coverages = [100.0 * a["area"] / (32 * 32) for a in anns]
        best = min(range(len(anns)), key=lambda k: (abs(coverages[k] - coverage), k))
        served = ds[i][1][0].numpy().astype(np.uint8)
        assert np.array_equal(served, decode_segmentation(anns[best]["segmentation"]))


def test_toy_data_is_deterministic_and_in_format(tmp_path):
    a = make_toy_dataset(str(tmp_path / "a"), 2, 1, 32, 48, seed=3)
    b = make_toy_dataset(str(tmp_path / "b"), 2, 1, 32, 48, seed=3)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 4 * 2 * 2 + 4  # train images + masks, val images
    for rel in files:
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read()
    forms = set()
    for rel in files:
        if rel.endswith(".json"):
            data = json.load(open(os.path.join(a, rel)))
            forms.add(type(data).__name__)
            anns = data["annotations"] if isinstance(data, dict) else data
            assert len(anns) >= 4
            areas = [x["area"] for x in anns]
            assert len(set(areas)) >= 3  # segments of different sizes
            for x in anns:
                assert x["segmentation"]["size"] == [32, 48]
                assert decode_segmentation(x["segmentation"]).sum() == x["area"]
    assert forms == {"dict", "list"}


def test_missing_masks_reported_at_start(toy_root, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(toy_root, root)
    os.remove(os.path.join(root, "masks", "discs", "discs_train_0003.json"))
    os.remove(os.path.join(root, "masks", "boxes", "boxes_train_0001.json"))
    with pytest.raises(DataError, match=r"2 of 32 images .* no mask file(.|\n)*discs_train_0003.json"):
        SegmentMaskImageFolder(root, with_masks=True)
    ds = SegmentMaskImageFolder(root, with_masks=True, allow_missing_masks=True)
    assert len(ds) == 30
    assert all("discs_train_0003" not in p for p, _ in ds.samples)
    # patches needs no masks at all
    shutil.rmtree(os.path.join(root, "masks"))
    assert len(SegmentMaskImageFolder(root, with_masks=False)) == 32
    with pytest.raises(DataError, match="no masks/ folder"):
        SegmentMaskImageFolder(root, with_masks=True)


def test_bad_paths_and_corrupt_image(toy_root, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_pretrain_dataset(str(tmp_path / "nowhere"), PretrainTransform(32), with_masks=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        build_pretrain_dataset(str(tmp_path / "empty"), PretrainTransform(32), with_masks=False)
    root = str(tmp_path / "corrupt")
    shutil.copytree(toy_root, root)
    victim = os.path.join(root, "train", "boxes", "boxes_train_0000.png")
    with open(victim, "r+b") as f:
        f.truncate(60)
    ds = build_pretrain_dataset(root, PretrainTransform(32), with_masks=True)
    with pytest.raises(DataError, match="boxes_train_0000.png"):
        ds[0]


def test_several_roots_are_concatenated(toy_root, tmp_path):
    other = make_toy_dataset(str(tmp_path / "other"), 3, 1, 32, 32, seed=5)
    ds = build_pretrain_dataset([toy_root, other], PretrainTransform(32), with_masks=True)
    assert len(ds) == 32 + 12
    assert ds[40][0].shape == (3, 32, 32)


def test_mask_of_other_resolution_is_resized(tmp_path):
    root = tmp_path / "r"
    (root / "train" / "c").mkdir(parents=True)
    (root / "masks" / "c").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "train" / "c" / "x.jpg")
    m = np.zeros((20, 30), np.uint8)
    m[:, :15] = 1
    (root / "masks" / "c" / "x.json").write_text(json.dumps([{"segmentation": encode_segmentation(m), "area": int(m.sum())}]))
    t = PretrainTransform((40, 60), scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=0.0)
    _, mask, _ = build_pretrain_dataset(str(root), t, with_masks=True)[0]
    assert mask.shape == (1, 40, 60) and mask[0, :, :30].eq(1).all() and mask[0, :, 30:].eq(0).all()


def test_randaugment_strongest_posterize_does_not_crash():
    """Pillow 13 rejects posterize(0 bits), which timm's 'inc1' RandAugment asks for at magnitude 10."""
    from timm.data import auto_augment

    from inputs.classification import _patch_timm_posterize
    _patch_timm_posterize()  # as building the finetuning transform does
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(img)
    assert np.asarray(out).max() == 0  # 0 bits kept: black, as older Pillow gave
    assert np.asarray(auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=0)(img)).max() == 200 & 0xF0


# ------------------------------------------------------------------------------------------------
# --data_backend gpu: decode and crop on the training device (run here on the CPU device)

@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    """A toy dataset of 160x120 JPEG images (with their SAM mask files)."""
    return make_toy_dataset(str(tmp_path_factory.mktemp("jpeg")), train_per_class=3, val_per_class=1,
                            height=120, width=160, seed=3, image_format="jpg")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_gpu_data_path_gives_the_cpu_paths_crops_flips_and_masks(fmt, jpeg_root, toy_root):
    """Same seeds -> the same boxes and flips: masks identical, pixels within interpolation noise
    (torch's antialiased bicubic vs Pillow's), for JPEG (decoded by decode_jpeg on the device) and
    PNG (decoded in the worker)."""
    from inputs.gpu_decode import PendingBatch
    from inputs.pretrain import build_pretrain_transform, collate_pretrain
    root = jpeg_root if fmt == "jpeg" else toy_root
    size = 64 if fmt == "jpeg" else 24
    cpu = build_pretrain_dataset(root, build_pretrain_transform(size, "cpu"), with_masks=True, seed=5)
    gpu = build_pretrain_dataset(root, build_pretrain_transform(size, "gpu"), with_masks=True, seed=5)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        gpu.set_epoch(epoch)
        idx = range(len(cpu))
        a_imgs, a_masks, _ = collate_pretrain([cpu[i] for i in idx])
        pending, b_masks, _ = collate_pretrain([gpu[i] for i in idx])
        assert isinstance(pending, PendingBatch)
        assert all(item.encoded == (fmt == "jpeg") for item in pending.items)
        b_imgs = pending.to("cpu")
        assert b_imgs.shape == a_imgs.shape == (len(cpu), 3, size, size)
        assert torch.equal(a_masks, b_masks)
        diff = ((a_imgs - b_imgs) * std * 255).abs()  # in 8-bit levels
        assert diff.mean() < 1.0, diff.mean()
        # a wrong box or a missed flip moves whole edges: many pixels off by tens of levels
        assert (diff > 24).float().mean() < 0.01
    # the flips and crop scales of the device path: both flips, areas spread over (0.2, 1)
    t = build_pretrain_transform(size, "gpu")
    draws = [t.draw(120, 160, torch.Generator().manual_seed(i)) for i in range(400)]
    flips = sum(f for _, f in draws) / len(draws)
    areas = torch.tensor([h * w / (120 * 160) for (_, _, h, w), _ in draws])
    assert 0.42 < flips < 0.58 and areas.min() > 0.18 and areas.max() <= 1.0 and 0.45 < areas.mean() < 0.7


def test_gpu_data_path_names_a_broken_jpeg(jpeg_root, tmp_path):
    from inputs.pretrain import build_pretrain_transform, collate_pretrain
    from util.misc import UserError
    root = tmp_path / "broken"
    shutil.copytree(jpeg_root, root)
    victim = sorted((root / "train").rglob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:400] + b"\x00" * (len(data) - 400))  # header intact, pixels garbage
    ds = build_pretrain_dataset(str(root), build_pretrain_transform(32, "gpu"), with_masks=False)
    pending, _, _ = collate_pretrain([ds[i] for i in range(len(ds))])
    with pytest.raises(UserError, match=f"cannot decode image .*{victim.name}.*check_dataset"):
        pending.to("cpu")


def test_gpu_data_path_pretrains_like_the_cpu_path(jpeg_root, tmp_path):
    import main_pretrain

    def loss(backend):
        out = tmp_path / backend
        main_pretrain.cli(["--data_path", jpeg_root, "--model", "mae_vit_tiny_patch16", "--input_size", "64",
                           "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "1",
                           "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu",
                           "--mask_method", "four_channels", "--data_backend", backend, "--vis_freq", "1"])
        return json.loads(open(out / "log.txt").read().splitlines()[-1])["train_loss"]

    cpu, gpu = loss("cpu"), loss("gpu")
    assert abs(cpu - gpu) / cpu < 0.02, (cpu, gpu)


def test_device_prefetcher_yields_the_loaders_batches_in_order_and_passes_errors(jpeg_root):
    import threading

    from torch.utils.data import DataLoader

    from inputs.gpu_decode import DevicePrefetcher
    from inputs.pretrain import build_pretrain_transform, collate_pretrain
    ds = build_pretrain_dataset(jpeg_root, build_pretrain_transform(32, "gpu"), with_masks=True, seed=2)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_pretrain, num_workers=1)
    prefetched = DevicePrefetcher(loader, torch.device("cpu"))
    assert len(prefetched) == len(loader) == 4
    expected = [(b[0].to("cpu"), b[1]) for b in loader]
    got = list(prefetched)
    assert len(got) == 4
    for (imgs, masks, bad), (e_imgs, e_masks) in zip(got, expected):
        assert isinstance(imgs, torch.Tensor) and torch.equal(imgs, e_imgs) and torch.equal(masks, e_masks)
        assert bad == []

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise DataError("cannot read image broken.jpg")
            return torch.zeros(3, 2, 2), torch.zeros(1, 2, 2), 0

    seen = []
    with pytest.raises(DataError, match="broken.jpg"):
        for batch in DevicePrefetcher(DataLoader(Broken(), batch_size=2, collate_fn=collate_pretrain), "cpu"):
            seen.append(batch)
    assert len(seen) == 2  # the batches before the broken one arrived first

    # leaving the loop early stops the background thread
    for _ in DevicePrefetcher(DataLoader(Broken(), batch_size=1, collate_fn=collate_pretrain), "cpu"):
        break
    import gc
    import time
    gc.collect()
    deadline = time.time() + 5
    while any(t.name == "device-prefetcher" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "device-prefetcher" for t in threading.enumerate())


def test_gpu_data_path_resumes_exactly(jpeg_root, tmp_path):
    """Two epochs straight == one epoch, then a resumed second: the device path and its
    prefetcher keep the batches deterministic."""
    import main_pretrain

    def run(out, epochs, resume):
        main_pretrain.cli(["--data_path", jpeg_root, "--model", "mae_vit_tiny_patch16", "--input_size", "32",
                           "--batch_size", "4", "--epochs", str(epochs), "--warmup_epochs", "0", "--num_workers", "1",
                           "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu",
                           "--mask_method", "segments", "--data_backend", "gpu", "--save_freq", "1",
                           "--no_auto_resume"] + (["--resume", resume] if resume else []))

    run(tmp_path / "straight", 2, None)
    run(tmp_path / "resumed", 2, resume=str(tmp_path / "straight" / "checkpoint-0.pth"))
    a = torch.load(tmp_path / "straight" / "checkpoint-1.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint-1.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dataloader_pinning_reaches_the_pending_batch(monkeypatch):
    """pin_memory=True in the DataLoader pins the encoded files (the DataLoader's pin thread calls
    PendingBatch.pin_memory), so their copy to the GPU can be asynchronous."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from inputs.gpu_decode import PendingBatch, PendingImage
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.numel()) or self)
    items = [PendingImage(torch.zeros(n, dtype=torch.uint8), True, (0, 0, 1, 1), False, (4, 4), (0, 0, 0), (1, 1, 1))
             for n in (10, 20)]
    out = pin_memory((PendingBatch(items), None, []), device=None)
    assert isinstance(out[0], PendingBatch) and pinned == [10, 20]


def test_persistent_workers_see_each_new_epoch(toy_root):
    """Workers are forked once for the run; the epoch set in the main process still reseeds every
    sample, so each epoch equals what a fresh loader (or one process, or a resumed run) gives."""
    from torch.utils.data import DataLoader

    from inputs.pretrain import build_pretrain_transform, collate_pretrain, loader_options

    def first_batch(loader):
        imgs, masks, _ = next(iter(loader))
        return imgs, masks

    ds = build_pretrain_dataset(toy_root, build_pretrain_transform((32, 32), "cpu"), with_masks=True,
                                coverage_ratio=30)
    options = loader_options(2, prefetch_factor=2)
    assert options["persistent_workers"] and loader_options(0)["num_workers"] == 0
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_pretrain, **options)
    ds.set_epoch(0)
    epoch0 = first_batch(loader)
    workers = loader._iterator
    ds.set_epoch(1)
    epoch1 = first_batch(loader)
    assert loader._iterator is workers  # the same worker processes
    assert not torch.equal(epoch0[0], epoch1[0])
    fresh = DataLoader(ds, batch_size=8, collate_fn=collate_pretrain, num_workers=0)
    assert all(torch.equal(a, b) for a, b in zip(first_batch(fresh), epoch1))
