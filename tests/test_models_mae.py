"""The model: reference equality, the mask methods' inputs, loss weights and gradient flow."""
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

import models_mae
from mask_methods import PreEncoder, patch_loss_weights, random_masking, visible_input
from models_mae import MaskedAutoencoderViT
from util.pos_embed import get_2d_sincos_pos_embed


def tiny(mask_method="patches", img_size=32, patch_size=8, **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
               norm_layer=partial(nn.LayerNorm, eps=1e-6), mask_method=mask_method)
    cfg.update(kw)
    return MaskedAutoencoderViT(**cfg)


def block_mask(n=2, h=32, w=32):
    """Hides a 12x20 rectangle (not patch-aligned) in every image."""
    m = torch.zeros(n, 1, h, w)
    m[:, :, 4:16, 6:26] = 1
    return m


# ------------------------------------------------------------------------------------------------
# equality with facebookresearch/mae

@pytest.mark.parametrize("norm_pix", [0, 1])
def test_patches_equals_reference(reference_fixture, norm_pix):
    ref = reference_fixture
    model = MaskedAutoencoderViT(**ref["config"], norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                 norm_pix_loss=bool(norm_pix))
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        loss, pred, mask = model(ref["imgs"], mask_ratio=float(ref["mask_ratio"]), noise=ref["noise"])
    torch.testing.assert_close(loss, ref[f"loss_normpix{norm_pix}"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pred, ref[f"pred_normpix{norm_pix}"], rtol=0, atol=1e-5)
    assert torch.equal(mask, ref[f"mask_normpix{norm_pix}"])


def test_state_dict_keys_and_pos_embed_match_reference(reference_fixture):
    ref = reference_fixture
    model = MaskedAutoencoderViT(**ref["config"], norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref["state_dict"].items()}
    assert ours == theirs
    # the fixed sin-cos tables are bit-identical to the reference's
    assert torch.equal(model.pos_embed, ref["state_dict"]["pos_embed"])
    assert torch.equal(model.decoder_pos_embed, ref["state_dict"]["decoder_pos_embed"])


def test_official_encoder_checkpoint_loads_strict():
    """The official mae_pretrain_vit_base.pth is a timm ViT-B/16 encoder state dict without head."""
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="")
    official = vit.state_dict()
    model = models_mae.mae_vit_base_patch16(decoder_depth=1)
    encoder_keys = {k for k in model.state_dict() if not k.startswith(("decoder", "mask_token"))}
    assert encoder_keys == set(official)
    missing, unexpected = model.load_state_dict(official, strict=False)
    assert not unexpected
    assert all(k.startswith(("decoder", "mask_token")) for k in missing)


def test_registry_names_and_shapes():
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
                 "mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_tiny_patch8",
                 "mae_vit_tiny_patch4", "mae_vit_small_patch8", "mae_vit_small_patch4"):
        assert name in models_mae.MODEL_NAMES
    expected = {"mae_vit_base_patch16": (768, 16), "mae_vit_large_patch16": (1024, 16),
                "mae_vit_huge_patch14": (1280, 14), "mae_vit_tiny_patch16": (192, 16),
                "mae_vit_small_patch8": (384, 8), "mae_vit_tiny_patch4": (192, 4)}
    for name, (dim, patch) in expected.items():
        m = models_mae.build_mae(name, depth=1, decoder_depth=1, img_size=56 if patch == 14 else 64)
        assert m.cls_token.shape[-1] == dim and m.patch_size == patch
        assert models_mae.model_patch_size(name) == patch
    with pytest.raises(ValueError, match="unknown model"):
        models_mae.build_mae("mae_vit_gigantic")


def test_rectangular_input_and_patchify_roundtrip():
    model = tiny(img_size=(16, 64), patch_size=8)
    assert model.grid_size == (2, 8)
    imgs = torch.randn(3, 3, 16, 64)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert pred.shape == (3, 16, 8 * 8 * 3) and mask.shape == (3, 16)
    assert mask.sum(1).eq(12).all()
    pos = get_2d_sincos_pos_embed(32, (2, 8), cls_token=True)
    assert pos.shape == (17, 32)
    # column coordinate in the first half of the channels, row in the second (reference order)
    assert (pos[1 + 1, :16] != pos[1 + 0, :16]).any() and (pos[1 + 1, 16:] == pos[1 + 0, 16:]).all()
    assert (pos[1 + 8, :16] == pos[1 + 0, :16]).all()


# ------------------------------------------------------------------------------------------------
# the mask methods

def capture_patch_embed_input(model):
    seen = {}
    model.patch_embed.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("x", inp[0].detach()))
    return seen


@pytest.mark.parametrize("method", ["segments", "four_channels", "preencoder"])
def test_encoder_input_of_segment_methods(method):
    model = tiny(method)
    imgs, m = torch.randn(2, 3, 32, 32), block_mask()
    seen = capture_patch_embed_input(model)
    model(imgs, seg_mask=m)
    x = seen["x"]
    if method == "four_channels":
        assert model.patch_embed.proj.in_channels == 4
        assert torch.equal(x, torch.cat([imgs * (1 - m), 1 - m], dim=1))
    else:
        # preencoder starts as identity on RGB, zero on the mask channel: the ViT sees x * v
        assert model.patch_embed.proj.in_channels == 3
        torch.testing.assert_close(x, imgs * (1 - m), rtol=0, atol=1e-6)
    # the decoder always predicts the 3 image channels of every patch
    assert model.decoder_pred.out_features == 8 * 8 * 3
    # attention runs through F.scaled_dot_product_attention (timm's fused path)
    assert all(blk.attn.fused_attn for blk in [*model.blocks, *model.decoder_blocks])


def test_visible_input_shapes():
    imgs, m = torch.randn(2, 3, 8, 8), block_mask(2, 8, 8)
    assert visible_input(imgs, m, "segments").shape == (2, 3, 8, 8)
    assert visible_input(imgs, m[:, 0], "four_channels").shape == (2, 4, 8, 8)
    with pytest.raises(ValueError):
        visible_input(imgs, m, "patches")


def test_preencoder_identity_init_and_structure():
    pre = PreEncoder(patch_size=4, in_chans=4, out_chans=3)
    assert isinstance(pre.proj, nn.Conv2d) and pre.proj.kernel_size == (4, 4) and pre.proj.stride == (4, 4)
    assert pre.proj.out_channels == 3 * 16 and isinstance(pre.shuffle, nn.PixelShuffle)
    x = torch.randn(2, 4, 16, 12)
    torch.testing.assert_close(pre(x), x[:, :3], rtol=0, atol=1e-6)
    assert torch.count_nonzero(pre.proj.weight[:, 3]) == 0


def test_loss_weights_are_hidden_fraction_and_loss_is_weighted_mean():
    model = tiny("segments", seg_loss="patch")  # the per-patch form (--seg_loss patch)
    imgs, m = torch.randn(2, 3, 32, 32), block_mask()
    loss, pred, weights = model(imgs, seg_mask=m)
    # rows 4:16 and cols 6:26 on an 8-pixel grid: patch (0, 0) has rows 4-7 x cols 6-7 hidden
    expected = torch.zeros(4, 4)
    rows = [4 / 8, 8 / 8, 0, 0]
    cols = [2 / 8, 8 / 8, 8 / 8, 2 / 8]
    for i in range(4):
        for j in range(4):
            expected[i, j] = rows[i] * cols[j]
    assert torch.allclose(weights, expected.flatten().expand(2, -1))
    per_patch = ((pred - model.patchify(imgs)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * weights).sum() / weights.sum())
    assert torch.equal(patch_loss_weights(m, 8), weights)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("method", ["segments", "four_channels", "preencoder"])
def test_default_loss_is_mean_squared_error_over_hidden_pixels(method, norm_pix):
    """loss = sum(m * e) / sum(m) over every hidden pixel and channel, computed directly on the
    image grid (no patchify in the formula)."""
    model = tiny(method, norm_pix_loss=norm_pix)
    assert model.seg_loss == "pixel"
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    m = block_mask()
    m[1, :, 20:30, 2:9] = 1.0  # a second, irregular region in one sample
    loss, pred, weights = model(imgs, seg_mask=m)
    target = imgs
    if norm_pix:  # per-patch normalised target, as MAE's norm_pix_loss
        t = model.patchify(imgs)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** .5
        target = model.unpatchify(t)
    e = (model.unpatchify(pred) - target) ** 2  # (N, 3, H, W)
    hidden = m.expand(-1, 3, -1, -1)
    torch.testing.assert_close(loss, (e * hidden).sum() / hidden.sum())
    # visible pixels do not count: changing the prediction there changes nothing; and no gradient
    pred_leaf = pred.detach().requires_grad_(True)
    visible_noise = model.patchify((1 - m).expand(-1, 3, -1, -1) * 7.0)
    same = model.forward_loss(imgs, pred_leaf + visible_noise, model.patchify(m))
    torch.testing.assert_close(same, loss)
    same.backward()
    grad_img = model.unpatchify(pred_leaf.grad)
    assert torch.count_nonzero(grad_img * (1 - m)) == 0 and torch.count_nonzero(grad_img * m) > 0
    # the older per-patch form differs on these masks (a fifth of its weight falls on seen pixels)
    patch_loss = model.forward_loss(imgs, pred, weights)
    assert not torch.allclose(patch_loss, loss)


def test_seg_loss_is_checked():
    with pytest.raises(ValueError, match="seg_loss"):
        tiny("segments", seg_loss="pixels")


@pytest.mark.parametrize("method", ["segments", "four_channels", "preencoder"])
def test_empty_segment_gives_zero_loss_not_nan(method):
    model = tiny(method)
    imgs = torch.randn(2, 3, 32, 32)
    loss, _, weights = model(imgs, seg_mask=torch.zeros(2, 1, 32, 32))
    assert loss.item() == 0.0 and weights.sum() == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # one empty sample in a batch contributes nothing: same loss as the other sample alone
    m = block_mask()
    m[1] = 0
    loss_both, _, _ = model(imgs, seg_mask=m)
    loss_first, _, _ = model(imgs[:1], seg_mask=m[:1])
    torch.testing.assert_close(loss_both, loss_first)


@pytest.mark.parametrize("method", ["segments", "four_channels", "preencoder"])
def test_hidden_pixels_do_not_reach_the_prediction(method):
    model = tiny(method)
    imgs, m = torch.randn(2, 3, 32, 32), block_mask()
    _, pred_a, _ = model(imgs, seg_mask=m)
    changed = imgs + 5.0 * m  # different content only where hidden
    _, pred_b, _ = model(changed, seg_mask=m)
    assert torch.equal(pred_a, pred_b)


def test_dropped_patches_do_not_reach_the_prediction():
    model = tiny("patches")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    _, pred_a, mask = model(imgs, mask_ratio=0.75, noise=noise)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, 8 * 8 * 3))
    _, pred_b, _ = model(imgs + 3.0 * pixel_mask, mask_ratio=0.75, noise=noise)
    assert torch.equal(pred_a, pred_b)


@pytest.mark.parametrize("method", ["patches", "segments", "four_channels", "preencoder"])
def test_gradient_flow(method):
    model = tiny(method)
    imgs = torch.randn(2, 3, 32, 32)
    loss, _, _ = model(imgs, mask_ratio=0.75, seg_mask=block_mask())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight", "cls_token"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["pos_embed"] is None and grads["decoder_pos_embed"] is None  # fixed sin-cos
    if method == "patches":
        assert grads["mask_token"].abs().sum() > 0
    else:
        assert not model.mask_token.requires_grad and grads["mask_token"] is None
    if method == "preencoder":
        g = grads["preencoder.proj.weight"]
        assert g.abs().sum() > 0 and g[:, 3].abs().sum() > 0  # the mask channel learns too
    if method == "four_channels":
        assert grads["patch_embed.proj.weight"][:, 3].abs().sum() > 0


def test_segment_methods_need_a_mask():
    with pytest.raises(ValueError, match="needs seg_mask"):
        tiny("segments")(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown mask_method"):
        tiny("no_such_method")


def test_random_masking_keeps_the_lowest_noise():
    x = torch.arange(8.).view(1, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]])
    kept, mask, ids_restore = random_masking(x, 0.5, noise)
    assert kept.flatten().tolist() == [1., 3., 5., 7.]
    assert mask.tolist() == [[1., 0., 1., 0., 1., 0., 1., 0.]]
    assert torch.equal(torch.argsort(torch.argsort(noise)), ids_restore)


def test_pretrain_autocast_bf16_on_cpu_runs():
    model = tiny("four_channels")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(torch.randn(2, 3, 32, 32), seg_mask=block_mask())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """--compile path: the compiled model gives the eager loss and gradients (CPU inductor)."""
    model = tiny("four_channels")
    imgs, m = torch.randn(2, 3, 32, 32), block_mask()
    loss, _, _ = model(imgs, seg_mask=m)
    loss.backward()
    eager_grad = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model)
    loss_c, _, _ = compiled(imgs, seg_mask=m)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.patch_embed.proj.weight.grad, eager_grad, rtol=1e-3, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    imgs, m = torch.randn(2, 3, 32, 32), block_mask()
    grads = []
    for ckpt in (False, True):
        model = tiny("four_channels", grad_checkpointing=ckpt)
        loss, _, _ = model(imgs, seg_mask=m)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
