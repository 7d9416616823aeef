"""Union14M's text-line MAE: its model names, its roots (class folders, LMDB) and its recipe."""
import pytest
import torch

import main_pretrain
import models_mae
import models_vit
from test_pretrain_cli import common


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def vit_blocks(dim: int, depth: int) -> int:
    # LayerNorm, qkv, proj, LayerNorm, fc1 (4x), fc2: 12 D^2 + 13 D per block
    return depth * (12 * dim * dim + 13 * dim)


def union14m_mae_params(dim: int) -> int:
    """Trainable parameters of Union14M's mae_vit_*_patch4_dec512d8b at 32 x 128 (mae/models_mae.py
    there): patch 4, depth 12, decoder 512 wide x 8 blocks; both position tables are fixed."""
    encoder = (48 * dim + dim) + dim + vit_blocks(dim, 12) + 2 * dim  # patch_embed, cls, blocks, norm
    decoder = (dim * 512 + 512) + 512 + vit_blocks(512, 8) + 2 * 512 + (512 * 48 + 48)
    return encoder + decoder


@pytest.mark.parametrize("name,dim", [("mae_vit_small_patch4", 384), ("mae_vit_base_patch4", 768)])
def test_union14m_names_build_union14m_models(name, dim):
    assert models_mae.default_input_size(name) == [32, 128]
    model = models_mae.build_mae(name, img_size=(32, 128))
    assert trainable(model) == union14m_mae_params(dim)
    assert model.decoder_embed.out_features == 512 and len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16 and model.blocks[0].attn.num_heads == dim // 64
    assert model.pos_embed.shape == (1, 1 + 8 * 32, dim) and not model.pos_embed.requires_grad
    imgs = torch.randn(2, 3, 32, 128)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert pred.shape == (2, 256, 48) and mask.shape == (2, 256) and int(mask[0].sum()) == 192


def test_vit_base_patch4_for_finetuning():
    model = models_vit.build_vit("vit_base_patch4", img_size=(32, 128), num_classes=10)
    assert models_vit.default_input_size("vit_base_patch4") == [32, 128]
    assert models_vit.model_patch_size("vit_base_patch4") == 4
    # finetuning learns the position table (timm's ViT, as in the reference): 1 + 8 x 32 rows
    encoder = (48 * 768 + 768) + 768 + (1 + 256) * 768 + vit_blocks(768, 12)
    head = 2 * 768 + 768 * 10 + 10  # fc_norm (global pool) or norm, and the head
    assert trainable(model) == encoder + head
    assert model(torch.randn(1, 3, 32, 128)).shape == (1, 10)


def test_the_old_small_patch4_model_keeps_its_explicit_name():
    old = models_mae.build_mae("mae_vit_small_patch4_dec256d4b", img_size=32)
    assert old.decoder_embed.out_features == 256 and len(old.decoder_blocks) == 4
    assert models_mae.model_of_checkpoint("mae_vit_small_patch4", old.state_dict()) == "mae_vit_small_patch4_dec256d4b"
    new = models_mae.build_mae("mae_vit_small_patch4", img_size=32)
    assert models_mae.model_of_checkpoint("mae_vit_small_patch4", new.state_dict()) == "mae_vit_small_patch4"


@pytest.mark.slow
def test_an_old_small_patch4_run_resumes_as_the_model_it_holds(toy_root, tmp_path, capsys):
    """A checkpoint written when mae_vit_small_patch4 was the 256 x 4 decoder model (it records
    that name) continues as that model, not as Union14M's."""
    old = tmp_path / "old"
    main_pretrain.cli(common(toy_root, old, "--model", "mae_vit_small_patch4_dec256d4b", "--input_size", "16"))
    ckpt = torch.load(old / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    ckpt["args"].model = "mae_vit_small_patch4"  # what a run of that time recorded
    torch.save(ckpt, old / "checkpoint-0.pth")
    resumed = tmp_path / "resumed"
    main_pretrain.cli(common(toy_root, resumed, "--model", "mae_vit_small_patch4", "--input_size", "16",
                             "--epochs", "2", "--resume", str(old / "checkpoint-0.pth")))
    assert "holds the model now named mae_vit_small_patch4_dec256d4b" in capsys.readouterr().out
    after = torch.load(resumed / "checkpoint-1.pth", map_location="cpu", weights_only=False)
    assert after["epoch"] == 1 and after["args"].model == "mae_vit_small_patch4_dec256d4b"
    models_mae.build_mae(after["args"].model, img_size=16).load_state_dict(after["model"], strict=True)
