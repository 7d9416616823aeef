"""Union14M's text-line MAE: its model names, its roots (class folders, LMDB) and its recipe."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from test_pretrain_cli import common

import main_finetune
import main_pretrain
import models_mae
import models_vit
from inputs.images import DataError
from inputs.pretrain import (BadSample, PretrainTransform, build_pretrain_dataset, build_pretrain_transform,
                             collate_pretrain)


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


# ------------------------------------------------------------------------------------------------
# roots of three kinds: root/train/<class>, <class> folders directly inside, an LMDB database

@pytest.fixture(scope="module")
def text_lmdb(tmp_path_factory):
    from tools.make_toy_data import make_toy_text_lmdb
    return make_toy_text_lmdb(str(tmp_path_factory.mktemp("lmdb") / "lines"), n=16, seed=3)


def class_folder_root(toy_root, dest):
    """toy_root's train/ classes and masks/ directly in one folder, as Union14M-U's folders are."""
    for name in os.listdir(os.path.join(toy_root, "train")):
        shutil.copytree(os.path.join(toy_root, "train", name), dest / name)
    shutil.copytree(os.path.join(toy_root, "masks"), dest / "masks")
    return str(dest)


def test_roots_of_every_kind_mix_and_say_what_they_were_taken_as(toy_root, text_lmdb, tmp_path, capsys):
    flat = class_folder_root(toy_root, tmp_path / "flat")
    transform = build_pretrain_transform(32)
    dataset = build_pretrain_dataset([toy_root, flat, text_lmdb], transform, with_masks=False)
    out = capsys.readouterr().out
    assert f"--data_path {toy_root}: train/ split (32 images, 4 classes)" in out
    assert f"--data_path {flat}: class folders directly inside (32 images, 4 classes)" in out  # masks/ is no class
    assert f"--data_path {text_lmdb}: an LMDB database (16 images" in out
    assert len(dataset) == 32 + 32 + 16
    img, label = dataset[64]
    assert img.shape == (3, 32, 32) and label == 0
    # with masks: a root of class folders gives the same images, masks and labels as the same tree under train/
    split = build_pretrain_dataset(toy_root, transform, with_masks=True, coverage_ratio=30)
    flat_ds = build_pretrain_dataset(flat, transform, with_masks=True, coverage_ratio=30)
    for i in (0, 9, 31):
        (a_img, a_mask, a_label), (b_img, b_mask, b_label) = split[i], flat_ds[i]
        assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask) and a_label == b_label
        assert a_mask.sum() > 0


def test_lmdb_images_decode_in_forked_workers(text_lmdb):
    dataset = build_pretrain_dataset(text_lmdb, build_pretrain_transform([32, 128], augment="resize",
                                                                          normalization="vit"), with_masks=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_pretrain)
    batches = [imgs for imgs, _, _ in loader]
    assert len(batches) == 4 and all(b.shape == (4, 3, 32, 128) for b in batches)
    serial = torch.stack([dataset[i][0] for i in range(16)])
    assert torch.equal(torch.cat(batches), serial)  # each worker opened the database itself
    assert serial.min() >= -1 and serial.max() <= 1  # mean = std = 0.5


def write_lmdb(path, entries: dict):
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in entries.items():
            txn.put(k.encode(), v)
    env.close()
    return str(path)


def test_lmdb_problems_are_clear_errors(toy_root, text_lmdb, tmp_path, capsys):
    no_count = write_lmdb(tmp_path / "no_count", {"image-000000001": b"x"})
    with pytest.raises(DataError, match="without the key 'num-samples'"):
        build_pretrain_dataset(no_count, build_pretrain_transform(32), with_masks=False)
    with pytest.raises(SystemExit) as exc:
        main_pretrain.cli(common(text_lmdb, tmp_path / "o", "--mask_method", "segments"))
    assert exc.value.code == 1
    assert f"--data_path {text_lmdb} is an LMDB database, which holds images only" in capsys.readouterr().err
    import io

    from PIL import Image
    good = io.BytesIO()
    Image.new("RGB", (128, 32), (200, 10, 10)).save(good, format="PNG")
    broken = write_lmdb(tmp_path / "broken", {"num-samples": b"3", "image-000000001": good.getvalue(),
                                              "image-000000002": b"not an image", "image-000000003": good.getvalue()})
    strict = build_pretrain_dataset(broken, build_pretrain_transform(32), with_masks=False)
    with pytest.raises(DataError, match=r"broken\[image-000000002\]"):
        strict[1]
    lenient = build_pretrain_dataset(broken, build_pretrain_transform(32), with_masks=False, skip_bad_samples=True)
    assert isinstance(lenient[1], BadSample) and "image-000000002" in lenient[1].message
    # end to end: the bad image is skipped and counted
    main_pretrain.cli(common(broken, tmp_path / "skip", "--skip_bad_samples", "--batch_size", "3"))
    row = json.loads((tmp_path / "skip" / "log.txt").read_text().splitlines()[-1])
    assert row["train_bad_samples"] == 1


def test_an_empty_folder_is_no_root_of_any_kind(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no train/ folder, no class folders and no LMDB database"):
        build_pretrain_dataset(str(tmp_path / "empty"), build_pretrain_transform(32), with_masks=False)


# ------------------------------------------------------------------------------------------------
# the text-line recipe: resize only, 0.5 / 0.5, --log_freq

def test_resize_only_transform_is_a_plain_resize_of_image_and_mask():
    from PIL import Image
    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 256, size=(40, 150, 3)).astype(np.uint8))
    mask = np.zeros((40, 150), np.uint8)
    mask[:, :75] = 1
    t = PretrainTransform([32, 128], mean=(0.5,) * 3, std=(0.5,) * 3, resize_only=True)
    a_img, a_mask = t(img, mask, generator=torch.Generator().manual_seed(1))
    b_img, b_mask = t(img, mask, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)  # nothing random: no crop, no flip
    expected = (TF.to_tensor(TF.resize(img, [32, 128], T.InterpolationMode.BICUBIC)) - 0.5) / 0.5
    assert torch.allclose(a_img, expected, atol=1e-6)
    assert torch.equal(a_mask[0, :, :64], torch.ones(32, 64)) and a_mask[0, :, 64:].sum() == 0  # not flipped


@pytest.mark.slow
def test_union14m_command_on_a_tiny_lmdb_and_its_recipe_downstream(text_lmdb, toy_root, toy_ade20k, tmp_path, capsys):
    """Union14M's README command with paths changed: --model mae_vit_small_patch4 on LMDB and
    class-folder roots, its defaults (32 x 128, resize only, 0.5 / 0.5), --log_freq in TensorBoard."""
    flat = class_folder_root(toy_root, tmp_path / "flat")
    out = tmp_path / "u14m"
    main_pretrain.cli(["--data_path", text_lmdb, flat, "--model", "mae_vit_small_patch4", "--batch_size", "8",
                       "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "2", "--device", "cpu",
                       "--output_dir", str(out), "--log_freq", "2", "--opt", "adamw", "--opt_betas", "0.9", "0.95"])
    ckpt = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    args = ckpt["args"]
    assert args.input_size == [32, 128] and args.augment == "resize" and args.normalization == "vit"
    assert ckpt["model"]["decoder_embed.weight"].shape == (512, 384)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next(out.glob("events.out.tfevents*"))), size_guidance={"images": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]  # 48 images / 8 = 6 steps: every 2nd is logged
    assert steps == [int(i / 6 * 1000) for i in (1, 3, 5)]
    assert [e.step for e in events.Images("train/reconstructions_1000x")] == steps
    assert [e.step for e in events.Scalars("train/lr")] == steps
    # finetuning from it takes its recipe (and records it)
    capsys.readouterr()
    ft = tmp_path / "ft"
    main_finetune.cli(["--data_path", toy_root, "--model", "vit_small_patch4", "--input_size", "32", "128",
                       "--nb_classes", "4", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
                       "--num_workers", "0", "--device", "cpu", "--output_dir", str(ft), "--finetune",
                       str(out / "checkpoint-0.pth")])
    printed = capsys.readouterr().out
    assert "--augment resize taken from" in printed and "--normalization vit taken from" in printed
    saved = torch.load(ft / "checkpoint-0.pth", map_location="cpu", weights_only=False)["args"]
    assert saved.augment == "resize" and saved.normalization == "vit"


def test_the_segmenter_takes_the_normalisation_of_its_encoder(text_lmdb, toy_ade20k, tmp_path, capsys):
    import segmenter.train as seg_train
    out = tmp_path / "pre"
    main_pretrain.cli(common(text_lmdb, out, "--augment", "resize", "--normalization", "vit"))
    capsys.readouterr()
    seg_train.cli(["--dataset-dir", toy_ade20k, "--log-dir", str(tmp_path / "seg"), "--backbone", "vit_tiny_patch8",
                   "--decoder", "linear", "--crop-size", "32", "--batch-size", "8", "--num-workers", "0",
                   "--device", "cpu", "--mae-chp", str(out / "checkpoint-0.pth"), "--eval-only"])
    assert f"--normalization vit taken from {out / 'checkpoint-0.pth'}" in capsys.readouterr().out


def test_log_freq_leaves_training_unchanged(toy_root, tmp_path):
    """The mid-epoch reconstruction grid draws its masks from a forked random state: the weights
    after an epoch are those of a run that logs nothing."""
    main_pretrain.cli(common(toy_root, tmp_path / "plain", "--vis_freq", "0"))
    main_pretrain.cli(common(toy_root, tmp_path / "logged", "--log_freq", "1", "--vis_freq", "0"))
    a = torch.load(tmp_path / "plain" / "checkpoint-0.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "logged" / "checkpoint-0.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_text_line_encoder_exports_to_timm_with_its_config(tmp_path):
    """Patch 4 at 32 x 128 with 0.5 / 0.5: the timm config names a model timm has, the arguments
    that make it this one, and the normalisation; timm then gives the same features."""
    import argparse

    import timm

    from tools import export
    torch.manual_seed(0)
    mae = models_mae.build_mae("mae_vit_tiny_patch4", img_size=(32, 128))
    path = tmp_path / "checkpoint-0.pth"
    args = argparse.Namespace(model="mae_vit_tiny_patch4", mask_method="patches", input_size=[32, 128],
                              augment="resize", normalization="vit")
    torch.save({"model": mae.state_dict(), "epoch": 0, "args": args}, path)
    export.main(["--checkpoint", str(path), "--to", "timm", "--out", str(tmp_path / "timm")])
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] in timm.list_models() and config["model_args"] == {"patch_size": 4, "img_size": [32, 128]}
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 and config["pretrained_cfg"]["input_size"] == [3, 32, 128]
    model = timm.create_model(config["architecture"], num_classes=0, **config["model_args"],
                              checkpoint_path=str(tmp_path / "timm" / "model.safetensors")).eval()
    ours = models_vit.build_vit("vit_tiny_patch4", img_size=(32, 128), num_classes=0)
    ours.load_state_dict({k: v for k, v in mae.state_dict().items()
                          if not k.startswith(("decoder", "mask_token"))}, strict=False)
    x = torch.randn(2, 3, 32, 128)
    with torch.no_grad():
        assert (model.forward_features(x) - ours.eval().forward_features(x)).abs().max() <= 1e-5


def test_the_data_tools_read_a_root_of_class_folders(toy_root, tmp_path, capsys):
    """check_dataset, build_mask_cache and write_shards take the class-folder root as training does."""
    from tools import build_mask_cache, check_dataset, write_shards
    flat = class_folder_root(toy_root, tmp_path / "flat")
    report = check_dataset.check(flat, coverage=30.0)
    assert report["images"] == 32 and not report["problems"]
    build_mask_cache.main(["--data_path", flat, "--coverage_ratio", "30", "--workers", "1"])
    capsys.readouterr()
    cached = build_pretrain_dataset(flat, build_pretrain_transform(32), with_masks=True, coverage_ratio=30)
    assert "Using the mask cache" in capsys.readouterr().out
    assert len(cached) == 32 and "masks_cache" not in cached.folders[0].classes
    plain = build_pretrain_dataset(toy_root, build_pretrain_transform(32), with_masks=True, coverage_ratio=30)
    assert torch.equal(cached[5][1], plain[5][1])  # the cached segment is the one read from masks/
    written = write_shards.write_shards(flat, str(tmp_path / "shards"), samples_per_shard=10)
    assert sum(s["samples"] for s in written["shards"]) == 32 and written["masks"] == "json"
    assert "masks" not in written["classes"] and len(written["classes"]) == 4
    lmdb_root = tmp_path / "lines"
    from tools.make_toy_data import make_toy_text_lmdb
    make_toy_text_lmdb(str(lmdb_root), n=4)
    assert "is an LMDB database: it holds no image files" in check_dataset.check(str(lmdb_root))["problems"][0]


def test_finetuning_takes_the_pretraining_size_unless_given(toy_root, pretrained, tmp_path, capsys):
    argv = ["--data_path", toy_root, "--model", "vit_tiny_patch8", "--nb_classes", "4", "--batch_size", "8",
            "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu",
            "--finetune", pretrained["patches"]]
    main_finetune.cli(argv + ["--output_dir", str(tmp_path / "a")])
    assert f"--input_size 32 32 taken from {pretrained['patches']}" in capsys.readouterr().out
    assert torch.load(tmp_path / "a" / "checkpoint-0.pth", weights_only=False)["args"].input_size == [32, 32]
    main_finetune.cli(argv + ["--output_dir", str(tmp_path / "b"), "--input_size", "48"])
    assert "--input_size 32 32 taken from" not in capsys.readouterr().out  # a given size stays
    assert torch.load(tmp_path / "b" / "checkpoint-0.pth", weights_only=False)["args"].input_size == [48]
