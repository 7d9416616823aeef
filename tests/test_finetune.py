"""Finetuning, linear probing and checkpoint adaptation for every mask method."""
import json

import pytest
import timm
import torch

import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
from conftest import METHODS
from models_vit import encoder_state_dict, fold_visibility_channel, load_pretrained_encoder, stack_official_into_mae
from util.lars import LARS
from util.lr_decay import param_groups_layer_decay


def downstream(toy_root, out, *extra):
    return ["--data_path", toy_root, "--model", "vit_tiny_patch8", "--input_size", "32", "--nb_classes", "4",
            "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
            "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "2", *extra]


def tiny_vit(**kw):
    torch.manual_seed(0)
    return models_vit.vit_tiny_patch8(img_size=32, num_classes=4, **kw)


# ------------------------------------------------------------------------------------------------
# finetuning / probing end to end

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_finetunes_and_evaluates(toy_root, pretrained, tmp_path, method, capsys):
    out = tmp_path / "ft"
    main_finetune.cli(downstream(toy_root, out, "--finetune", pretrained[method]))
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert {"train_loss", "test_acc1", "test_acc5", "max_accuracy"} <= set(stats)
    assert stats["test_acc5"] == 100.0  # 4 classes: the true one is always in the top 5
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"].mask_method == method and ckpt["args"].in_chans == 3  # folded by default
    assert (out / "checkpoint-best.pth").exists() or stats["max_accuracy"] == 0.0
    capsys.readouterr()
    # --eval --resume prints top-1 / top-5 and gives the logged accuracy
    result = main_finetune.cli(downstream(toy_root, tmp_path / "ev", "--eval", "--resume", str(out / "checkpoint-0.pth")))
    assert "Acc@1" in capsys.readouterr().out
    assert result["acc1"] == pytest.approx(stats["test_acc1"]) and result["count"] == 8


def test_four_channels_unfolded_finetunes_and_evaluates(toy_root, pretrained, tmp_path):
    out = tmp_path / "ft4"
    main_finetune.cli(downstream(toy_root, out, "--finetune", pretrained["four_channels"], "--no_fold_mask_channel",
                                 "--mixup", "0.8", "--cutmix", "1.0", "--clip_grad", "1.0"))
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"].in_chans == 4 and ckpt["model"]["patch_embed.proj.weight"].shape[1] == 4
    # evaluation of a 4-channel finetuned model reads in_chans from the checkpoint
    result = main_finetune.cli(downstream(toy_root, tmp_path / "ev", "--eval", "--resume", str(out / "checkpoint-0.pth")))
    logged = json.loads((out / "log.txt").read_text())
    assert result["acc1"] == pytest.approx(logged["test_acc1"])


def test_linear_probe_trains_only_the_head(toy_root, pretrained, tmp_path):
    out = tmp_path / "lin"
    main_linprobe.cli(downstream(toy_root, out, "--finetune", pretrained["preencoder"], "--blr", "0.1"))
    probed = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    pre = torch.load(pretrained["preencoder"], weights_only=True)["model"]
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "norm.weight", "cls_token"):
        assert torch.equal(probed[key], pre[key]), key  # frozen encoder
    assert "head.0.running_mean" in probed and "head.0.weight" not in probed  # BatchNorm without affine
    assert probed["head.1.weight"].shape == (4, 192)
    assert not any(k.startswith("preencoder.") for k in probed)


# ------------------------------------------------------------------------------------------------
# adaptation

def test_adaptation_drops_pretraining_only_keys(pretrained):
    for method in METHODS:
        ckpt = torch.load(pretrained[method], weights_only=True)
        sd = encoder_state_dict(ckpt, method)
        assert not any(k.startswith(("decoder_", "mask_token", "preencoder.")) for k in sd)
        assert sd["patch_embed.proj.weight"].shape[1] == 3
        model = tiny_vit(global_pool=True)
        _, missing, unexpected = load_pretrained_encoder(model, pretrained[method])
        assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert unexpected == []
        model = tiny_vit(global_pool=False)
        _, missing, unexpected = load_pretrained_encoder(model, pretrained[method])
        assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
        assert torch.equal(model.norm.weight, ckpt["model"]["norm.weight"])


def test_folded_and_unfolded_models_give_the_same_logits(pretrained):
    folded, unfolded = tiny_vit(in_chans=3), tiny_vit(in_chans=4)
    load_pretrained_encoder(folded, pretrained["four_channels"], fold_mask_channel=True)
    load_pretrained_encoder(unfolded, pretrained["four_channels"], fold_mask_channel=False)
    unfolded.head.load_state_dict(folded.head.state_dict())
    folded.eval(), unfolded.eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(folded(x), unfolded(x), rtol=1e-5, atol=1e-5)
    # and the 4-channel model given the constant channel explicitly
    torch.testing.assert_close(unfolded(torch.cat([x, torch.ones(3, 1, 32, 32)], 1)), unfolded(x))
    w, b = torch.randn(5, 4, 2, 2), torch.randn(5)
    w3, b3 = fold_visibility_channel(w, b)
    img = torch.randn(1, 3, 2, 2)
    conv4 = torch.nn.functional.conv2d(torch.cat([img, torch.ones(1, 1, 2, 2)], 1), w, b)
    torch.testing.assert_close(torch.nn.functional.conv2d(img, w3, b3), conv4)


@pytest.mark.parametrize("size", [[48], [32, 64]])
def test_position_embeddings_are_interpolated_to_another_size(pretrained, size, capsys):
    model = models_vit.vit_tiny_patch8(img_size=tuple(size * (3 - len(size))), num_classes=4)
    load_pretrained_encoder(model, pretrained["segments"])
    assert "Position embedding interpolated from 4x4" in capsys.readouterr().out
    grid = model.patch_embed.grid_size
    assert model.pos_embed.shape == (1, 1 + grid[0] * grid[1], 192)
    pre = torch.load(pretrained["segments"], weights_only=True)["model"]["pos_embed"]
    assert torch.equal(model.pos_embed[:, 0], pre[:, 0])  # the class token's entry is kept
    assert model(torch.randn(2, 3, *model.patch_embed.img_size)).shape == (2, 4)


def test_mismatches_are_clear_errors(toy_root, pretrained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main_finetune.cli(downstream(toy_root, tmp_path / "a", "--finetune", pretrained["four_channels"],
                                     "--mask_method", "segments"))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "--mask_method segments disagrees" in err and "pretrained with --mask_method four_channels" in err
    with pytest.raises(SystemExit):
        main_finetune.cli(downstream(toy_root, tmp_path / "b", "--finetune", pretrained["patches"],
                                     "--model", "vit_small_patch8"))
    err = capsys.readouterr().err
    assert "fits --model vit_tiny_patch8" in err
    with pytest.raises(SystemExit) as exc:
        main_finetune.cli(downstream(toy_root, tmp_path / "c", "--eval"))
    assert exc.value.code == 2


def test_finetuned_state_dict_loads_into_timm():
    ours = models_vit.vit_tiny_patch16(num_classes=10, global_pool=True)
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, global_pool="avg")
    timm_model.load_state_dict(ours.state_dict(), strict=True)
    ours_cls = models_vit.vit_tiny_patch16(num_classes=10, global_pool=False)
    timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).load_state_dict(
        ours_cls.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    ours.eval(), timm_model.eval()
    torch.testing.assert_close(ours(x), timm_model(x))


# ------------------------------------------------------------------------------------------------
# --stack

def official_like_checkpoint(path):
    """An official MAE encoder file: {'model': timm ViT state dict without head}."""
    torch.manual_seed(3)
    vit = models_vit.vit_tiny_patch8(img_size=32, num_classes=0)
    torch.save({"model": vit.state_dict()}, path)
    return vit


@pytest.mark.parametrize("method", METHODS)
def test_stack_with_zero_mask_channel_equals_the_official_encoder(tmp_path, method):
    vit = official_like_checkpoint(tmp_path / "official.pth")
    mae = models_mae.mae_vit_tiny_patch8(img_size=32, mask_method=method)
    stack_official_into_mae(mae, str(tmp_path / "official.pth"))
    if method == "four_channels":
        assert mae.patch_embed.proj.weight[:, 3].abs().sum() == 0
    x = torch.randn(2, 3, 32, 32)
    vit.eval(), mae.eval()
    with torch.no_grad():
        expected = vit.forward_features(x)
        if method == "patches":
            noise = torch.arange(16.).expand(2, 16)  # keep the first 4 tokens
            latent, _, _ = mae.forward_encoder(x, 0.75, noise=noise)
            expected = vit.norm(vit.blocks(torch.cat([vit.cls_token.expand(2, -1, -1) + vit.pos_embed[:, :1],
                                                      (vit.patch_embed(x) + vit.pos_embed[:, 1:])[:, :4]], 1)))
        else:
            latent, _, _ = mae.forward_encoder(x, 0.75, seg_mask=torch.zeros(2, 1, 32, 32))
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


def test_stack_cli_runs(toy_root, tmp_path):
    official_like_checkpoint(tmp_path / "official.pth")
    out = tmp_path / "stacked"
    main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                       "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
                       "--output_dir", str(out), "--log_dir", str(out), "--device", "cpu",
                       "--mask_method", "four_channels", "--stack", str(tmp_path / "official.pth")])
    sd = torch.load(out / "checkpoint-0.pth", weights_only=True)["model"]
    assert sd["patch_embed.proj.weight"].shape[1] == 4


# ------------------------------------------------------------------------------------------------
# optimizers

def test_layer_decay_groups():
    model = tiny_vit()
    groups = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
    n = len(model.blocks) + 1
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["cls_token"])]["lr_scale"] == 0.5 ** n
    assert by_param[id(named["cls_token"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.3.mlp.fc1.weight"])]["lr_scale"] == 0.5 ** (n - 4)
    assert by_param[id(named["blocks.3.mlp.fc1.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["head.bias"])]["weight_decay"] == 0.0


def test_lars_scales_weight_updates_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = LARS([w, b], lr=1.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 0.5)
    b.grad = torch.ones(2)
    opt.step()
    # ||w|| = 6, ||g|| = 1: update = 0.001 * 6 / 1 * g = 0.003
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 3.0 - 0.003))
    torch.testing.assert_close(b.detach(), torch.full((2,), -1.0))  # plain SGD step for 1-d params


def test_finetune_resume_is_exact_and_keeps_the_best_accuracy(toy_root, pretrained, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--finetune", pretrained["segments"], "--epochs", "2", "--mixup", "0.5", "--blr", "5e-3"]
    main_finetune.cli(downstream(toy_root, straight, *flags))
    main_finetune.cli(downstream(toy_root, resumed, *flags, "--resume", str(straight / "checkpoint-0.pth")))
    a = torch.load(straight / "checkpoint-1.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint-1.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    best_after_epoch0 = json.loads((straight / "log.txt").read_text().splitlines()[0])["max_accuracy"]
    assert json.loads((resumed / "log.txt").read_text())["max_accuracy"] >= best_after_epoch0
    assert a["args"].max_accuracy == b["args"].max_accuracy
