"""segment_tokens: MAE's token dropping with SAM's segments as the hidden set."""
import json

import pytest
import torch
from test_distributed import pretrain_one_and_two_ranks
from test_faults import seg_argv
from test_finetune import downstream
from test_mask_layouts import layout_roots  # noqa: F401 (a fixture)
from test_models_mae import tiny
from test_pretrain_cli import common

import main_finetune
import main_pretrain
import segmenter.train
from mask_methods import content_noise, get_method, patch_loss_weights

METHOD = get_method("segment_tokens")


def grid_mask(cells, n=1, grid=4, patch=8):
    """A segment covering exactly the patches ``cells`` (row-major indices on a grid x grid map)."""
    m = torch.zeros(n, 1, grid * patch, grid * patch)
    for c in cells:
        r, k = divmod(c, grid)
        m[:, :, r * patch:(r + 1) * patch, k * patch:(k + 1) * patch] = 1
    return m


def hide(seg_mask, mask_ratio=0.75, patch=8, noise=None):
    n, _, h, w = seg_mask.shape
    tokens = torch.arange(n * (h // patch) * (w // patch), dtype=torch.float32).reshape(n, -1, 1)
    kept, mask, ids_restore = METHOD.hide_tokens(tokens, mask_ratio, noise, seg_mask, patch)
    return kept, mask, ids_restore


def test_a_segment_of_exactly_mask_ratio_is_the_hidden_set():
    cells = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # 12 of 16 patches = 75 %
    _, mask, _ = hide(grid_mask(cells))
    assert mask[0].nonzero().flatten().tolist() == cells
    assert float(METHOD.batch_stats(mask, grid_mask(cells))["hidden_segment"]) == 1.0


def test_the_fill_hides_other_patches_and_every_sample_keeps_as_many_tokens():
    seg = torch.cat([grid_mask([5, 6]), grid_mask(list(range(16))), grid_mask([]), grid_mask([0, 15])])
    seg[3, :, 0:4, 8:16] = 1  # half of patch 1: after the fully covered ones, before random fill
    kept, mask, ids_restore = hide(seg)
    assert kept.shape == (4, 4, 1)  # the same number of kept tokens in every sample
    assert mask.sum(dim=1).tolist() == [12.0] * 4  # no patch hidden twice, none missing
    assert mask[0, [5, 6]].tolist() == [1, 1] and mask[3, [0, 15, 1]].tolist() == [1, 1, 1]
    coverage = patch_loss_weights(seg, 8)
    # the fill never takes a patch the segment covers more than one it hides
    for i in range(4):
        hidden_cov, kept_cov = coverage[i][mask[i] == 1], coverage[i][mask[i] == 0]
        assert hidden_cov.min() >= kept_cov.max()
    # ids_restore un-shuffles [kept, dropped] exactly as for patches
    tokens = torch.arange(64, dtype=torch.float32).reshape(4, 16, 1)
    dropped = torch.full((4, 12, 1), -1.0)
    restored = torch.gather(torch.cat([kept, dropped], 1), 1, ids_restore.unsqueeze(-1))
    assert torch.equal(restored[mask == 0], tokens[mask == 0])
    stats = METHOD.batch_stats(mask, seg)
    assert float(stats["hidden_segment"]) == pytest.approx((2 + 12 + 0 + 3) / 48)  # half-covered counts


def test_the_fill_is_random_but_a_function_of_the_sample():
    seg = grid_mask([5, 6], n=1)
    noise = content_noise(patch_loss_weights(seg, 8), 8)
    assert torch.equal(noise, content_noise(patch_loss_weights(torch.cat([grid_mask([1]), seg]), 8), 8)[1:])
    other = content_noise(patch_loss_weights(grid_mask([5, 7]), 8), 8)
    assert not torch.equal(noise, other)  # another crop of the segment: another fill
    assert 0.3 < float(noise.mean()) < 0.7


def test_the_loss_ignores_what_the_encoder_saw():
    model = tiny("segment_tokens")
    imgs = torch.randn(2, 3, 32, 32)
    seg = grid_mask([0, 1, 2, 3, 4, 5], n=2)
    loss, pred, mask = model(imgs, mask_ratio=0.75, seg_mask=seg)
    assert mask.shape == (2, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    changed = imgs.clone()
    visible = model.unpatchify((1 - mask).unsqueeze(-1).expand(-1, -1, 8 * 8 * 3)).bool()
    changed[visible] += 5.0  # only pixels of kept patches change
    loss2, _, mask2 = model(changed, mask_ratio=0.75, seg_mask=seg)
    assert torch.equal(mask, mask2)
    # the encoder sees the change, so pred changes; the target of the loss does not (dropped patches)
    target_loss = model.forward_loss(changed, pred, mask)
    assert torch.allclose(target_loss, loss)
    # gradient reaches the encoder through kept tokens only, and no grad flows from kept patches' error
    model.zero_grad()
    pred = pred.detach().requires_grad_(True)
    model.forward_loss(imgs, pred, mask).backward()
    assert pred.grad[mask == 0].abs().sum() == 0 and pred.grad[mask == 1].abs().sum() > 0


def test_the_encoder_sees_only_the_kept_tokens():
    model = tiny("segment_tokens")
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 32, 32), 0.75, seg_mask=grid_mask([3], n=2))
    assert latent.shape == (2, 1 + 4, 32) and ids_restore.shape == (2, 16)
    assert model.mask_token.requires_grad  # the decoder's mask tokens are trained, as for patches


@pytest.mark.slow
def test_pretrain_finetune_and_segmenter(toy_root, toy_ade20k, tmp_path):
    out = tmp_path / "pre"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segment_tokens", "--coverage_ratio", "30"))
    log = json.loads((out / "log.txt").read_text())
    # a random crop may leave a segment out: counted as empty, its hidden set all fill
    assert 0 < log["train_hidden_segment"] <= 1 and log["train_hidden"] == 0.75 and "train_empty_segments" in log
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=False)
    assert ckpt["args"].mask_method == "segment_tokens" and ckpt["model"]["patch_embed.proj.weight"].shape[1] == 3
    main_finetune.cli(downstream(toy_root, tmp_path / "ft", "--finetune", str(out / "checkpoint-0.pth")))
    assert (tmp_path / "ft" / "checkpoint-0.pth").exists()
    metrics = segmenter.train.cli(seg_argv(toy_ade20k, tmp_path / "seg") + ["--mae-chp", str(out / "checkpoint-0.pth")])
    assert metrics["mIoU"] >= 0


@pytest.mark.slow
def test_two_ranks_train_as_one_process(toy_root, tmp_path):
    flags = ["--mask_method", "segment_tokens", "--coverage_ratio", "30", "--epochs", "1", "--warmup_epochs", "0",
             "--blr", "5e-3"]
    one, two = pretrain_one_and_two_ranks(toy_root, tmp_path, flags)
    a = torch.load(one / "checkpoint-0.pth", weights_only=True)["model"]
    b = torch.load(two / "checkpoint-0.pth", weights_only=True)["model"]
    for k in a:  # the same hidden sets on any rank: the same gradient, up to float summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)


def test_pictures_draw_the_segment_black_and_the_fill_red():
    from evals.visualize import FILL_COLOUR, mask_panels, panel_titles
    seg = grid_mask([0, 1, 2, 3, 4, 5])  # 6 of the 12 hidden patches; 6 more are fill
    panels = mask_panels("segment_tokens", torch.zeros(1, 3, 32, 32), seg, 0.75, 8)
    visibility = panels[0, 2]  # (3, H, W)
    per_patch = visibility[:, ::8, ::8].reshape(3, 16).T  # one pixel per patch
    black = (per_patch == 0).all(dim=1)
    red = torch.isclose(per_patch, torch.tensor(FILL_COLOUR)).all(dim=1)
    white = (per_patch == 1).all(dim=1)
    assert black.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert int(red.sum()) == 6 and int(white.sum()) == 4
    assert "red: random fill" in panel_titles("segment_tokens", "SAM vit_b", 40)[2]


@pytest.mark.slow
def test_every_mask_layout_trains_and_every_export_takes_the_checkpoint(layout_roots, tmp_path):
    import timm
    from test_export import features_of_ours

    from tools import export
    for fmt, root in layout_roots.items():
        main_pretrain.cli(common(root, tmp_path / fmt, "--mask_method", "segment_tokens", "--input_size", "32",
                                 "--batch_size", "4", "--coverage_ratio", "40"))
        assert json.loads((tmp_path / fmt / "log.txt").read_text())["train_hidden_segment"] > 0, fmt
    ckpt = str(tmp_path / "json" / "checkpoint-0.pth")
    export.main(["--checkpoint", ckpt, "--to", "timm", "--out", str(tmp_path / "timm")])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, patch_size=8, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors"),
                                                          num_classes=0)).eval()
    ours, _ = features_of_ours(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.forward_features(x) - ours.forward_features(x)).abs().max() <= 1e-5
    for target in ("hf", "hf-mae", "encoder"):
        assert export.main(["--checkpoint", ckpt, "--to", target, "--out", str(tmp_path / target)])


@pytest.mark.slow
def test_stack_on_an_official_checkpoint_and_knn(toy_root, tmp_path):
    from test_finetune import official_like_checkpoint

    import evals.knn as knn
    official_like_checkpoint(tmp_path / "official.pth")
    official = torch.load(tmp_path / "official.pth", weights_only=True)["model"]
    out = tmp_path / "stacked"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segment_tokens", "--coverage_ratio", "30", "--stack",
                             str(tmp_path / "official.pth"), "--blr", "0"))
    sd = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    assert torch.equal(sd["patch_embed.proj.weight"], official["patch_embed.proj.weight"])  # lr 0: unchanged
    result = knn.knn_eval(knn.get_args_parser().parse_args(
        ["--checkpoint", str(out / "checkpoint-0.pth"), "--data_path", toy_root, "--device", "cpu",
         "--num_workers", "0"]))
    assert result["method"] == "segment_tokens" and 0 <= result["knn_top1"] <= 100


def test_a_resume_keeps_the_mask_ratio_it_was_trained_with(toy_root, tmp_path, capsys):
    out = tmp_path / "pre"
    main_pretrain.cli(common(toy_root, out, "--mask_method", "segment_tokens", "--coverage_ratio", "30",
                             "--epochs", "2", "--stop_epoch", "1"))
    with pytest.raises(SystemExit):
        main_pretrain.cli(common(toy_root, out, "--mask_method", "segment_tokens", "--coverage_ratio", "30",
                                 "--epochs", "2", "--mask_ratio", "0.5"))
    assert "was trained with --mask_ratio 0.75, but this run has --mask_ratio 0.5" in capsys.readouterr().err
