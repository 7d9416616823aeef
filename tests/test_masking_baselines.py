"""The masking baselines a SAM method is compared with (blocks, BEiT's blockwise, ColorMAE's
filtered noise) and the SAM segments chosen otherwise (random, union): exact token counts, the
shapes they hide, their spectra, and their randomness (per sample and epoch, the same on any number
of ranks)."""
import math

import numpy as np
import pytest
import torch

import main_finetune
import mask_methods as masking
from inputs.pretrain import PretrainDataset, SegmentMaskImageFolder
from mask_methods import get_method, noise_field_filter
from sam.layouts import ImageSegments, Segment, segment_mask

GRIDS = [(7, 7), (14, 14), (16, 16), (14, 28)]
RATIOS = [0.4, 0.75, 0.9]


def dropped(method, grid, ratio, n=6, noise=None, seg_mask=None, patch=4):
    torch.manual_seed(0)
    length = grid[0] * grid[1]
    tokens = torch.randn(n, length, 3)
    kept, mask, ids_restore = method.hide_tokens(tokens, ratio, noise, seg_mask, patch, grid)
    return kept, mask, ids_restore


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_every_token_method_drops_exactly_the_ratio(grid, ratio):
    length = grid[0] * grid[1]
    expected = length - int(length * (1 - ratio))  # what the reference's random_masking drops
    seg = torch.zeros(6, 1, grid[0] * 4, grid[1] * 4)
    seg[:, :, : grid[0] * 2, : grid[1] * 3] = 1
    methods = [get_method("patches"), get_method("segment_tokens"), get_method("blockwise")]
    methods += [get_method("blocks", block_size=k) for k in (1, 2, 3, 4, 5, 7)]  # dividing the grids and not
    methods += [get_method("noise", noise_filter=f) for f in ("green", "blue", "red", "purple", "white")]
    for method in methods:
        kept, mask, _ = dropped(method, grid, ratio, seg_mask=seg)
        assert (mask.sum(1) == expected).all(), (method, grid, ratio)
        assert kept.shape[1] == length - expected, method


def test_blocks_of_one_patch_are_the_papers_masking():
    noise = torch.rand(4, 196)
    tokens = torch.randn(4, 196, 8)
    patches = get_method("patches").hide_tokens(tokens, 0.75, noise, None, 16, (14, 14))
    blocks = get_method("blocks", block_size=1).hide_tokens(tokens, 0.75, noise, None, 16, (14, 14))
    for a, b in zip(patches, blocks):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grid,k", [((14, 14), 4), ((16, 16), 4), ((14, 28), 3), ((7, 7), 2)])
def test_blocks_drop_whole_groups_but_one(grid, k):
    _, mask, _ = dropped(get_method("blocks", block_size=k), grid, 0.75, n=8)
    groups = torch.zeros(grid, dtype=torch.long)
    for r in range(grid[0]):
        for c in range(grid[1]):
            groups[r, c] = (r // k) * math.ceil(grid[1] / k) + c // k
    groups = groups.flatten()
    for sample in mask:
        partial = 0
        for g in groups.unique():
            members = sample[groups == g]
            if 0 < members.sum() < len(members):
                partial += 1
        assert partial <= 1  # every group dropped whole, except the one cut to hit the count
    bigger = get_method("blocks", block_size=k)
    assert dropped(bigger, grid, 0.75, n=8)[1].shape == mask.shape


def test_blockwise_rectangles_are_within_beits_bounds():
    method = get_method("blockwise", mask_ratio=0.6)
    torch.manual_seed(3)
    covered, rounds = method.rectangles(32, (14, 14), torch.device("cpu"))
    assert rounds, "no rectangle drawn"
    target = 196 - int(196 * 0.4)
    for r in rounds:
        took = r["added"]
        assert (r["area"][took] >= 16).all() and (r["area"][took] <= target).all()
        assert (r["aspect"] >= 0.3 - 1e-6).all() and (r["aspect"] <= 1 / 0.3 + 1e-6).all()
        assert ((r["top"] + r["h"]) <= 14).all() and ((r["left"] + r["w"]) <= 14).all()
    assert (covered.flatten(1).sum(1) >= target).float().mean() > 0.9  # rectangles, rarely random fill
    with pytest.raises(ValueError, match="blockwise_aspect"):
        get_method("blockwise", blockwise_aspect=2.0)


def test_the_green_filter_keeps_its_band():
    """The fields' power spectrum: green's power lies in its band (mid frequencies), white's does
    not; red's in the low ones, blue's in the high ones."""
    torch.manual_seed(0)
    radius = None

    def power(kind):
        nonlocal radius
        field = get_method("noise", noise_filter=kind).field(None, 16, (14, 14), torch.device("cpu"))
        spectrum = torch.fft.fft2(field - field.mean(dim=(1, 2), keepdim=True)).abs().pow(2).mean(0)
        fy = torch.fft.fftfreq(field.shape[-2]).view(-1, 1)
        fx = torch.fft.fftfreq(field.shape[-1]).view(1, -1)
        radius = (fy ** 2 + fx ** 2).sqrt()
        return spectrum

    def share(spectrum, low, high):
        band = (radius >= low) & (radius < high)
        return float(spectrum[band].sum() / spectrum.sum())

    green, white = power("green"), power("white")
    assert share(green, 0.04, 0.3) > 0.9 and share(white, 0.04, 0.3) < 0.35
    assert share(green, 0, 0.04) < 0.02 and share(green, 0.4, 1) < 0.05  # no DC, no fine grain
    assert share(power("red"), 0, 0.1) > 0.9 and share(power("blue"), 0.2, 1) > 0.9
    response = noise_field_filter((64, 64), "green", torch.device("cpu"))
    assert float(response[0, 0]) == pytest.approx(0.0, abs=1e-6)  # no DC: a band, not a blur


def segments_of(masks: list[np.ndarray]) -> ImageSegments:
    coverages = [100.0 * m.mean() for m in masks]
    return ImageSegments(coverages, lambda i: Segment(coverages[i], masks[i].shape, lambda i=i: masks[i], f"s{i}"),
                         "toy.json")


def test_union_hides_whole_segments_until_the_ratio():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(8):  # disjoint-ish blobs of various sizes on a 32 x 32 image
        m = np.zeros((32, 32), np.uint8)
        r, c, h, w = rng.integers(0, 24), rng.integers(0, 24), rng.integers(3, 9), rng.integers(3, 9)
        m[r:r + h, c:c + w] = 1
        masks.append(m)
    segments = segments_of(masks)
    for choice in ("union", "union_smallest"):
        method = get_method("segment_tokens", segment_choice=choice, mask_ratio=0.3)
        union = method.hidden_segment(segments, (32, 32), torch.Generator().manual_seed(1))
        inside = [i for i, m in enumerate(masks) if (m & union).any()]
        assert all(((masks[i] & union) == masks[i]).all() for i in inside)  # whole segments only
        assert np.array_equal(union, np.bitwise_or.reduce([masks[i] for i in inside]))
        if union.mean() < 0.3:
            assert len(inside) == len(masks)  # short only when every segment is in
        if choice == "union_smallest":
            sizes = sorted(m.sum() for m in masks)
            assert sorted(masks[i].sum() for i in inside) == sizes[:len(inside)]
    # the token method then drops the union's patches before any other
    seg = torch.from_numpy(union.astype(np.float32))[None, None]
    _, mask, _ = method.hide_tokens(torch.zeros(1, 64, 3), 0.3, None, seg, 4, (8, 8))
    covered = masking.patch_loss_weights(seg, 4)[0]
    first = covered.argsort(descending=True)[: int(mask.sum())]
    assert mask[0, first[covered[first] >= 0.5]].all()
    with pytest.raises(ValueError, match="token-dropping methods"):
        get_method("segments", segment_choice="union")


def test_a_random_segment_is_drawn_per_sample_and_epoch_alike_on_every_rank(toy_root):
    method = get_method("four_channels", segment_choice="random")
    assert method.cached_coverage() is None and get_method("four_channels").cached_coverage() == 50.0
    rank = [PretrainDataset([SegmentMaskImageFolder(toy_root, with_masks=True, segment_choice=method)],
                            transform=lambda img, mask=None, generator=None: (img, mask), seed=3) for _ in range(2)]
    epochs = []
    for epoch in (0, 1):
        for d in rank:
            d.set_epoch(epoch)
        masks = [rank[0][i][1] for i in range(12)]
        assert all(np.array_equal(m, rank[1][i][1]) for i, m in enumerate(masks))  # any rank, any worker
        epochs.append(masks)
    assert any(not np.array_equal(a, b) for a, b in zip(*epochs))  # another epoch, another draw
    closest = SegmentMaskImageFolder(toy_root, with_masks=True)
    assert all(np.array_equal(closest[i][1], closest.read(i, torch.Generator().manual_seed(i))[1]) for i in range(4))


NEW_METHODS = [("blocks", ["--block_size", "2"], {"block_size": 2, "mask_ratio": 0.75}),
               ("blockwise", [], {"blockwise_min_patches": 16, "blockwise_aspect": 0.3, "mask_ratio": 0.75}),
               ("noise", ["--noise_filter", "blue"], {"noise_filter": "blue", "mask_ratio": 0.75}),
               ("segments", ["--segment_choice", "random"], {"segment_choice": "random"}),
               ("segment_tokens", ["--segment_choice", "union"], {"segment_choice": "union"})]


@pytest.mark.slow
@pytest.mark.parametrize("method,flags,params", NEW_METHODS, ids=[m + "-" + "".join(f[1:]) for m, f, _ in NEW_METHODS])
def test_each_method_through_the_benchmark_then_finetune_and_export(method, flags, params, toy_root, toy_ade20k,
                                                                    tmp_path, capsys, monkeypatch):
    """Two chunks (the second resumes the first), each scored by kNN, the frozen probe and the
    Segmenter; then the last checkpoint finetuned and exported."""
    import benchmark
    from test_benchmark import bench_args
    from test_finetune import downstream
    from tools import export
    argv = bench_args(toy_root, toy_ade20k, tmp_path / "bench", "--probe-eval", "--probe-args",
                      "--epochs 1 --batch-size 8 --num-workers 0 --device cpu", "--knn-eval",
                      "--knn-bank-per-class", "4", "--knn-args", "--num_workers 0 --device cpu --batch_size 8",
                      method=method)
    argv[argv.index("--pretrain-args") + 1] += " " + " ".join(flags)
    rows = benchmark.cli(argv)
    assert [r["epochs"] for r in rows] == [1, 2] and all(r["method"] == method for r in rows)
    assert all(params.items() <= r["method_params"].items() for r in rows)
    assert all(0 <= r[k] <= 100 for r in rows for k in ("mIoU", "probe_miou", "knn_top1"))
    [checkpoint] = (tmp_path / "bench" / "pretrain_output").glob("*/checkpoint-2.pth")
    saved = torch.load(checkpoint, weights_only=False)["args"]
    assert saved.mask_method == method and params.items() <= saved.config["method"].items()
    main_finetune.cli(downstream(toy_root, tmp_path / "ft", "--finetune", str(checkpoint)))
    assert torch.load(tmp_path / "ft" / "checkpoint-0.pth", weights_only=False)["args"].mask_method == method
    assert export.main(["--checkpoint", str(checkpoint), "--to", "timm", "--out", str(tmp_path / "timm")])
    from tools import visualize
    assert visualize.main(["--checkpoint", str(checkpoint), "--data_path", toy_root, "--num", "1",
                           "--out", str(tmp_path / "vis")])
    if method != "blocks":
        return
    # the table's probe column, the probe panel, a rerun that redoes nothing, the random encoder's line
    table = capsys.readouterr().out.split("run ")[-1]
    assert " probe " in table and f"{rows[1]['probe_miou']:.2f}" in table
    import matplotlib.image
    png = matplotlib.image.imread(tmp_path / "bench" / "miou_vs_epochs.png")
    assert png.shape[1] > 2.7 * png.shape[0]  # Segmenter, probe and kNN panels side by side
    stages = []
    real = benchmark.run_stage
    monkeypatch.setattr(benchmark, "run_stage", lambda module, *a: stages.append(module) or real(module, *a))
    again = benchmark.cli(argv)
    assert stages == [] and [r["probe_miou"] for r in again] == [r["probe_miou"] for r in rows]
    baseline = benchmark.cli(argv + ["--eval", "random"])
    assert stages == ["evals.probe", "segmenter.train"]
    [random_row] = [r for r in baseline if r.get("baseline") == "random"]
    assert 0 <= random_row["probe_miou"] <= 100


def whole_segments_of(folder, rel: str) -> list[np.ndarray]:
    segments = folder.source.segments(rel)
    return [segment_mask(segments[k], (40, 32)).astype(bool) for k in range(len(segments))]


def check_choice(method, hidden: np.ndarray, whole: list[np.ndarray]) -> None:
    """random: one whole segment of the file; union: whole segments until --mask_ratio is covered."""
    hidden = hidden.astype(bool)
    if method.segment_choice == "random":
        assert any(np.array_equal(hidden, w) for w in whole)
    else:
        used = [w for w in whole if (w & hidden).sum() == w.sum()]
        assert np.array_equal(np.logical_or.reduce(used), hidden) and hidden.mean() >= method.mask_ratio


@pytest.mark.parametrize("fmt", ["json", "segmae", "amg"])
def test_segment_choices_read_whole_segments_from_every_layout_and_shards(fmt, tmp_path):
    from tools.make_toy_data import make_toy_dataset
    from tools.write_shards import write_shards

    from inputs.shards import build_shard_dataset
    root = make_toy_dataset(str(tmp_path / fmt), train_per_class=2, val_per_class=1, height=32, width=40, seed=3,
                            mask_format=fmt)
    write_shards(root, str(tmp_path / "shards"), samples_per_shard=4)  # tar shards keep the mask files whole
    for method in (get_method("segments", segment_choice="random"),
                   get_method("segment_tokens", segment_choice="union", mask_ratio=0.6)):
        folder = SegmentMaskImageFolder(root, with_masks=True, segment_choice=method)
        for i in range(len(folder)):
            hidden = folder.read(i, torch.Generator().manual_seed(i))[1]
            check_choice(method, hidden, whole_segments_of(folder, folder.rel_paths[i]))
        draws = {folder.read(0, torch.Generator().manual_seed(seed))[1].tobytes() for seed in range(12)}
        assert len(draws) > 1  # chosen by the sample's generator, not by a fixed rule
        shards = build_shard_dataset([str(tmp_path / "shards")], None, True, 50.0, batch_size=2, world_size=1,
                                     rank=0, seed=0, shuffle_buffer=0, skip_bad_samples=False, decode=True,
                                     segment_choice=method)
        plan = [(s, 0, int(c), 0) for s, c in zip(shards.shards, shards.counts)]
        samples = [sample for _, sample in shards._samples(plan)]
        assert len(samples) == len(folder)
        for sample in samples:
            hidden = shards.read(sample, "x", torch.Generator().manual_seed(0))[1]
            check_choice(method, hidden, whole_segments_of(folder, sample["path"].decode()))


def test_the_pictures_draw_each_methods_hidden_set(toy_root, tmp_path):
    from evals.visualize import mask_panels, panel_titles
    from tools import visualize
    imgs = torch.zeros(1, 3, 32, 48)
    for name in ("patches", "blocks", "blockwise", "noise"):
        torch.manual_seed(0)
        hidden = 1 - mask_panels(get_method(name, mask_ratio=0.75), imgs, patch_size=8)[0, 2, 0]
        assert hidden.mean().item() == 0.75  # 18 of the 24 patches, drawn as they are dropped
    torch.manual_seed(0)
    blocks = 1 - mask_panels(get_method("blocks", block_size=2), imgs, patch_size=8)[0, 2, 0]
    groups = blocks[::8, ::8].reshape(2, 2, 3, 2).permute(0, 2, 1, 3).reshape(6, 4).sum(1)
    assert sorted(groups.tolist()) == [0, 2, 4, 4, 4, 4]  # whole 2x2 groups and the one cut to hit 18
    assert "a random SAM segment" in panel_titles(get_method("segments", segment_choice="random"), "SAM")[2]
    union = panel_titles(get_method("segment_tokens", segment_choice="union_smallest", mask_ratio=0.6), "SAM")[2]
    assert "whole SAM segments (smallest first) up to 60%" in union
    written = visualize.main(["--data_path", toy_root, "--all_methods", "--num", "1", "--input_size", "32",
                              "--patch_size", "8", "--block_size", "2", "--segment_choice", "random",
                              "--out", str(tmp_path)])
    from PIL import Image
    with Image.open(written[0]) as grid:
        assert grid.height > len(masking.MASK_METHODS) * 224  # a row per registered method
    args = visualize.get_args_parser().parse_args(["--block_size", "2"])
    assert visualize.with_given_flags(get_method("blocks"), args, {"block_size"}).block_size == 2
    assert visualize.method_label(get_method("blocks", block_size=2)) == "blocks (mask_ratio 0.75, block_size 2)"
