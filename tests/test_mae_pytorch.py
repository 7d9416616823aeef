"""MAE-pytorch (pengzhiliang/MAE-pytorch) users: its optimizer flags mean what they mean there, and
its checkpoints (BEiT's ViT: no class token, a 1-D position table not stored) are refused whole."""
import argparse

import pytest
import torch
from test_benchmark import bench_args
from test_finetune import downstream
from test_pretrain_cli import common

import benchmark
import main_finetune
import main_linprobe
import main_pretrain


def beit_blocks(prefix: str, dim: int, depth: int) -> dict:
    """Block weights as BEiT / MAE-pytorch name them (qkv without bias, q_bias and v_bias apart)."""
    sd = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        sd.update({b + "norm1.weight": torch.ones(dim), b + "norm1.bias": torch.zeros(dim),
                   b + "attn.qkv.weight": torch.randn(3 * dim, dim), b + "attn.q_bias": torch.zeros(dim),
                   b + "attn.v_bias": torch.zeros(dim), b + "attn.proj.weight": torch.randn(dim, dim),
                   b + "attn.proj.bias": torch.zeros(dim), b + "norm2.weight": torch.ones(dim),
                   b + "norm2.bias": torch.zeros(dim), b + "mlp.fc1.weight": torch.randn(4 * dim, dim),
                   b + "mlp.fc1.bias": torch.zeros(4 * dim), b + "mlp.fc2.weight": torch.randn(dim, 4 * dim),
                   b + "mlp.fc2.bias": torch.zeros(dim)})
    return sd


def mae_pytorch_checkpoint(path, kind: str, dim: int = 192, patch: int = 8):
    """The layout of its pretraining checkpoints (the encoder under encoder., encoder_to_decoder,
    decoder 384 wide here scaled down) or of its finetuned ones (no cls_token, fc_norm, head)."""
    if kind == "pretraining":
        sd = {"encoder.patch_embed.proj.weight": torch.randn(dim, 3, patch, patch),
              "encoder.patch_embed.proj.bias": torch.zeros(dim), **beit_blocks("encoder.", dim, 2),
              "encoder.norm.weight": torch.ones(dim), "encoder.norm.bias": torch.zeros(dim),
              "encoder_to_decoder.weight": torch.randn(96, dim), "mask_token": torch.zeros(1, 1, 96),
              **beit_blocks("decoder.", 96, 1), "decoder.norm.weight": torch.ones(96),
              "decoder.norm.bias": torch.zeros(96), "decoder.head.weight": torch.randn(3 * patch * patch, 96),
              "decoder.head.bias": torch.zeros(3 * patch * patch)}
        args = argparse.Namespace(model="pretrain_mae_base_patch16_224", mask_ratio=0.75, opt="adamw")
    else:
        sd = {"patch_embed.proj.weight": torch.randn(dim, 3, patch, patch), "patch_embed.proj.bias": torch.zeros(dim),
              **beit_blocks("", dim, 2), "fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim),
              "head.weight": torch.randn(4, dim), "head.bias": torch.zeros(4)}
        args = argparse.Namespace(model="vit_base_patch16_224", nb_classes=4, opt="adamw")
    torch.save({"model": sd, "optimizer": {}, "epoch": 0, "args": args}, path)
    return str(path)


MESSAGE = "is a MAE-pytorch (pengzhiliang/MAE-pytorch) {} checkpoint: its ViT has no class token"


@pytest.mark.parametrize("kind", ["pretraining", "finetuned"])
def test_its_checkpoints_are_refused_by_finetune_and_linprobe(toy_root, tmp_path, capsys, kind):
    ckpt = mae_pytorch_checkpoint(tmp_path / f"{kind}.pth", kind)
    for cli in (main_finetune.cli, main_linprobe.cli):
        with pytest.raises(SystemExit) as exc:
            cli(downstream(toy_root, tmp_path / "ft", "--finetune", ckpt))
        err = capsys.readouterr().err
        assert exc.value.code == 1 and MESSAGE.format(kind) in err and "1-D" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ft" / "checkpoint-0.pth").exists()


def test_its_checkpoint_is_refused_by_resume_and_the_benchmark(toy_root, toy_ade20k, tmp_path, capsys):
    ckpt = mae_pytorch_checkpoint(tmp_path / "pre.pth", "pretraining")
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(toy_root, tmp_path / "o", "--resume", ckpt))
    assert exc.value.code == 1 and MESSAGE.format("pretraining") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(toy_root, tmp_path / "o", "--stack", ckpt))
    assert exc.value.code == 1 and MESSAGE.format("pretraining") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        benchmark.cli(bench_args(toy_root, toy_ade20k, tmp_path / "bench", "--stack", ckpt))
    assert exc.value.code == 1 and MESSAGE.format("pretraining") in capsys.readouterr().err
    assert not list((tmp_path / "bench").glob("pretrain_output/*/checkpoint-*.pth"))


def optimizer_groups(path):
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer"]["param_groups"]


def test_optimizer_flags_in_pretraining(toy_root, tmp_path, capsys):
    main_pretrain.cli(common(toy_root, tmp_path / "default"))
    groups = optimizer_groups(tmp_path / "default" / "checkpoint-0.pth")
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in groups)  # the reference's
    out = tmp_path / "flags"
    main_pretrain.cli(common(toy_root, out, "--opt", "adamw", "--opt_betas", "0.9", "0.98", "--opt_eps", "1e-6"))
    ckpt = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in ckpt["optimizer"]["param_groups"])
    assert ckpt["args"].opt == "adamw" and ckpt["args"].opt_betas == [0.9, 0.98]
    for bad, message in ((["--opt", "lars"], "--opt lars is not used by this script"),
                         (["--opt_betas", "0.9", "1.5"], "--opt_betas must be two numbers in [0, 1)"),
                         (["--opt_eps", "0"], "must be > 0")):
        with pytest.raises(SystemExit) as exc:
            main_pretrain.cli(common(toy_root, tmp_path / "bad", *bad))
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_optimizer_flags_in_finetuning_and_probing(toy_root, pretrained, tmp_path, capsys):
    main_finetune.cli(downstream(toy_root, tmp_path / "ft", "--finetune", pretrained["patches"]))
    assert all(g["betas"] == (0.9, 0.999) for g in optimizer_groups(tmp_path / "ft" / "checkpoint-0.pth"))
    main_finetune.cli(downstream(toy_root, tmp_path / "ft2", "--finetune", pretrained["patches"],
                                 "--opt", "adamw", "--opt_betas", "0.9", "0.99", "--opt_eps", "1e-7"))
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-7
               for g in optimizer_groups(tmp_path / "ft2" / "checkpoint-0.pth"))
    main_linprobe.cli(downstream(toy_root, tmp_path / "lin", "--finetune", pretrained["patches"]))
    (lars,) = optimizer_groups(tmp_path / "lin" / "checkpoint-0.pth")
    assert "trust_coefficient" in lars and "betas" not in lars  # LARS, the reference's
    main_linprobe.cli(downstream(toy_root, tmp_path / "lin2", "--finetune", pretrained["patches"],
                                 "--opt", "adamw", "--opt_betas", "0.9", "0.95"))
    (adamw,) = optimizer_groups(tmp_path / "lin2" / "checkpoint-0.pth")
    assert adamw["betas"] == (0.9, 0.95) and adamw["weight_decay"] == 0.0
    with pytest.raises(SystemExit) as exc:
        main_linprobe.cli(downstream(toy_root, tmp_path / "bad", "--opt_betas", "0.9", "0.95"))
    assert exc.value.code == 2 and "LARS (--opt lars) has none" in capsys.readouterr().err
