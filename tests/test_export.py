"""tools/export.py and hubconf.py against the real timm and transformers: what they load gives the
same features (and, for hf-mae, the same loss and reconstruction) as this repository's models."""
import os

import pytest
import torch

import models_mae
from conftest import REPO
from run.checkpoint import atomic_torch_save
from tools import export
from util.misc import UserError


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A patches checkpoint of the real mae_vit_base_patch16 shape (random weights), trained at 224."""
    import argparse
    torch.manual_seed(0)
    model = models_mae.build_mae("mae_vit_base_patch16", img_size=(224, 224), mask_method="patches")
    path = str(tmp_path_factory.mktemp("base") / "checkpoint-0.pth")
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_method="patches", input_size=[224, 224])
    atomic_torch_save({"model": model.state_dict(), "epoch": 0, "args": args}, path)
    return path


def features_of_ours(path):
    sd, _, _, size, shape = export.load_encoder(path)
    return export.build_timm_encoder(sd, shape, size), size


def test_timm_export_tiny_each_method(pretrained, tmp_path):
    import timm
    for method in ("patches", "four_channels", "preencoder", "segments"):
        out = tmp_path / method
        files = export.main(["--checkpoint", pretrained[method], "--to", "timm", "--out", str(out)])
        assert all(not f.endswith((".pth", ".bin", ".pkl")) for f in files)  # safetensors + json, no pickle
        model = timm.create_model("vit_tiny_patch16_224", pretrained=True, patch_size=8, img_size=32,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                              num_classes=0)).eval()
        ours, _ = features_of_ours(pretrained[method])
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert (model.forward_features(x) - ours.forward_features(x)).abs().max() <= 1e-5, method
        # at 224 timm resizes the position embedding itself: strict load, features of the right shape
        at224 = timm.create_model("vit_tiny_patch16_224", pretrained=True, patch_size=8,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0))
        assert at224.pos_embed.shape[1] == 1 + 28 * 28


def test_timm_export_loads_with_the_usual_call(pretrained, tmp_path):
    import timm
    export.main(["--checkpoint", pretrained["patches"], "--to", "timm", "--out", str(tmp_path)])
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, patch_size=8, img_size=32,
                              checkpoint_path=str(tmp_path / "model.safetensors")).eval()
    ours, _ = features_of_ours(pretrained["patches"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.forward_features(x) - ours.forward_features(x)).abs().max() <= 1e-5
    new_head = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=7, patch_size=8, img_size=32,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=0))
    assert new_head.head.out_features == 7


def test_timm_export_real_vit_base_shape(base_checkpoint, tmp_path):
    import timm
    export.main(["--checkpoint", base_checkpoint, "--to", "timm", "--out", str(tmp_path), "--timm_zero_head"])
    model = timm.create_model("vit_base_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"))).eval()
    ours, _ = features_of_ours(base_checkpoint)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model.forward_features(x) - ours.forward_features(x)).abs().max() <= 1e-5
        assert model(x).abs().max() == 0  # the exported head is zero: no classifier was trained


def test_hf_vit_export_equals_our_encoder(pretrained, tmp_path):
    from transformers import ViTModel
    for method in ("patches", "four_channels"):
        out = tmp_path / method
        export.main(["--checkpoint", pretrained[method], "--to", "hf", "--out", str(out)])
        assert "model.safetensors" in os.listdir(out)
        hf = ViTModel.from_pretrained(str(out), add_pooling_layer=False).eval()
        assert hf.config.layer_norm_eps == 1e-6
        ours, _ = features_of_ours(pretrained[method])
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            diff = (hf(pixel_values=x).last_hidden_state - ours.forward_features(x)).abs().max()
        assert diff <= 1e-5, (method, diff)


def test_hf_mae_export_equals_our_mae_with_the_same_noise(pretrained, tmp_path):
    from transformers import ViTMAEForPreTraining

    from run.checkpoint import load_checkpoint
    export.main(["--checkpoint", pretrained["patches"], "--to", "hf-mae", "--out", str(tmp_path)])
    hf = ViTMAEForPreTraining.from_pretrained(str(tmp_path)).eval()
    ours = models_mae.build_mae("mae_vit_tiny_patch8", img_size=(32, 32), mask_method="patches")
    ours.load_state_dict(load_checkpoint(pretrained["patches"])["model"])
    ours.eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = ours(x, mask_ratio=0.75, noise=noise)
        out = hf(pixel_values=x, noise=noise)
    assert torch.equal(out.mask, mask)
    assert (out.logits - pred).abs().max() <= 1e-5 and abs(out.loss - loss) <= 1e-5
    with pytest.raises(UserError, match="random patches only; this checkpoint is segments"):
        export.main(["--checkpoint", pretrained["segments"], "--to", "hf-mae", "--out", str(tmp_path / "x")])


def test_encoder_export_has_the_official_layout(pretrained, tmp_path):
    import models_vit
    export.main(["--checkpoint", pretrained["four_channels"], "--to", "encoder", "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert list(ckpt) == ["model"]
    sd = ckpt["model"]
    assert sd["patch_embed.proj.weight"].shape[1] == 3 and not any(k.startswith(("decoder", "mask_token",
                                                                                 "preencoder")) for k in sd)
    # what the original main_finetune.py does with it: strict=False, only head / fc_norm missing
    model = models_vit.build_vit("vit_tiny_patch8", img_size=(32, 32), num_classes=10, global_pool=True)
    missing, _ = model.load_state_dict(sd, strict=False)
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_torch_hub_returns_the_folded_encoder(pretrained):
    model = torch.hub.load(REPO, "mae_encoder", checkpoint=pretrained["four_channels"], source="local")
    ours, _ = features_of_ours(pretrained["four_channels"])
    assert model.patch_embed.proj.weight.shape[1] == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.forward_features(x) - ours.forward_features(x)).abs().max() <= 1e-6
