"""Segmenter checkpoints in rstrudel/segmenter's layout, both ways.

Its `checkpoint.pth` holds {model, optimizer, n_cls, lr_scheduler, epoch[, loss_scaler]}; the
model's keys are ours plus the encoder's unused ImageNet head (`encoder.head.*`, 1000 classes), and
the model's settings live in `variant.yml` beside it (`net_kwargs`, `dataset_kwargs`). Such a
checkpoint evaluates (or continues) here: the head is dropped, its optimizer state is not loaded,
the settings come from variant.yml or, without one, from the tensors' shapes. This repo's
Segmenter folder is written so that the original's `load_model` reads it: a variant.yml, and the
head's place filled with zeros.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import yaml

import models_vit
from run.checkpoint import CheckpointError
from run.files import atomic_write

ORIGINAL_HEAD_CLASSES = 1000  # the original's create_vit builds every encoder with an ImageNet head
ORIGINAL_NORM_EPS = 1e-5  # torch's LayerNorm default, used throughout the original's ViT
HEAD_KEYS = ("encoder.head.weight", "encoder.head.bias")
# our normalisation names <-> the original's (its "deit" statistics are ImageNet's)
TO_ORIGINAL_NORMALIZATION = {"imagenet": "deit", "vit": "vit"}


def is_original_layout(checkpoint: dict) -> bool:
    return "args" not in checkpoint and ("lr_scheduler" in checkpoint or HEAD_KEYS[0] in checkpoint.get("model", {}))


class _VariantLoader(yaml.SafeLoader):
    """Plain YAML and the one Python tag the original writes (!!python/tuple); any other tag (a
    crafted !!python/name, !!python/object) is refused rather than resolved."""


_VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: tuple(loader.construct_sequence(node)))


def read_variant(folder: str) -> dict | None:
    """<folder>/variant.yml as a dict (None without one); one that is not plain YAML, holds
    another tag or is not a mapping is one CheckpointError naming the file."""
    path = os.path.join(folder, "variant.yml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            variant = yaml.load(f, Loader=_VariantLoader)  # noqa: S506 - a SafeLoader with !!python/tuple only
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise CheckpointError(f"{path} is not a variant.yml this reader accepts ({problem}): only plain YAML and "
                              f"!!python/tuple are read; fix the file or move it away (the settings are then read "
                              f"off the checkpoint's tensors)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if variant is None:
        return None
    if not isinstance(variant, dict) or not all(isinstance(variant.get(k, {}), dict)
                                                for k in ("net_kwargs", "dataset_kwargs")):
        raise CheckpointError(f"{path} is not a Segmenter variant.yml (a mapping with net_kwargs and dataset_kwargs): "
                              f"fix the file or move it away")
    return variant


def original_settings(checkpoint: dict, path: str) -> argparse.Namespace:
    """The flags that define the model of an original checkpoint (variant.yml first, else shapes)."""
    sd = checkpoint["model"]
    if "encoder.dist_token" in sd:
        raise CheckpointError(f"{path} is a distilled DeiT Segmenter (encoder.dist_token): only ViT backbones "
                              f"are supported here")
    variant = read_variant(os.path.dirname(path)) or {}
    net = variant.get("net_kwargs", {})
    d_model = sd["encoder.cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    weight = sd["encoder.patch_embed.proj.weight"]
    patch, channels = weight.shape[-1], weight.shape[1]
    backbone = models_vit.name_for(d_model, depth, patch)
    if backbone is None:
        raise CheckpointError(f"{path}: no backbone here has embed {d_model}, depth {depth}, patch {patch}")
    crop = net.get("image_size", [math.isqrt(sd["encoder.pos_embed"].shape[1] - 1) * patch])
    crop = crop[0] if isinstance(crop, (list, tuple)) and crop else crop
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
        raise CheckpointError(f"{path}: its variant.yml's net_kwargs.image_size {crop!r:.40} is not a size: fix the "
                              f"file or move it away")
    normalization = variant.get("dataset_kwargs", {}).get("normalization")
    if normalization is None:
        print(f"{path}: no variant.yml beside it: input normalisation 'vit' (mean = std = 0.5), as the original's "
              f"ViT backbones; pass --normalization imagenet for a DeiT-normalised model")
        normalization = "vit"
    decoder = "mask_transformer" if "decoder.cls_emb" in sd else "linear"
    n_cls = int(checkpoint.get("n_cls", sd["decoder.cls_emb"].shape[1] if decoder == "mask_transformer"
                               else sd["decoder.head.weight"].shape[0]))
    return argparse.Namespace(backbone=backbone, decoder=decoder, n_cls=n_cls, crop_size=int(crop), channels=channels,
                              normalization="imagenet" if normalization == "deit" else normalization,
                              encoder_norm_eps=ORIGINAL_NORM_EPS)


def own_state_dict(checkpoint: dict) -> dict:
    """The model's weights without the encoder's classification head (ours holds zeros there)."""
    return {k: v for k, v in checkpoint["model"].items() if k not in HEAD_KEYS}


def with_original_head(state_dict: dict, embed_dim: int) -> dict:
    """Our weights with the zero head the original's strict load_model expects."""
    head = {HEAD_KEYS[0]: torch.zeros(ORIGINAL_HEAD_CLASSES, embed_dim), HEAD_KEYS[1]: torch.zeros(ORIGINAL_HEAD_CLASSES)}
    return {**state_dict, **head}


def set_layernorm_eps(module: torch.nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps


def write_variant(args, model, per_rank_batch: int, amp: str) -> None:
    """<log-dir>/variant.yml in the original's format: its load_model and eval.miou read it."""
    enc = model.encoder
    decoder = {"name": args.decoder}
    if args.decoder == "mask_transformer":
        decoder.update(drop_path_rate=0.0, dropout=model.decoder.blocks[0].attn.attn_drop.p,
                       n_layers=len(model.decoder.blocks))
    normalization = TO_ORIGINAL_NORMALIZATION[args.normalization]
    variant = {
        "world_batch_size": args.batch_size, "version": "normal", "resume": bool(args.resume),
        "dataset_kwargs": {"dataset": "ade20k", "image_size": args.eval_short_side, "crop_size": args.crop_size,
                           "batch_size": per_rank_batch, "normalization": normalization, "split": "train",
                           "num_workers": args.num_workers},
        "algorithm_kwargs": {"batch_size": per_rank_batch, "start_epoch": 0, "num_epochs": args.epochs,
                             "eval_freq": args.eval_freq},
        "optimizer_kwargs": {"opt": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
                             "momentum": 0.9, "clip_grad": None, "sched": "polynomial", "epochs": args.epochs,
                             "min_lr": args.min_lr, "poly_power": 0.9, "poly_step_size": 1},
        "net_kwargs": {"backbone": args.backbone, "image_size": [args.crop_size, args.crop_size],
                       "patch_size": enc.patch_size, "d_model": enc.embed_dim, "n_heads": enc.blocks[0].attn.num_heads,
                       "n_layers": len(enc.blocks), "normalization": normalization, "distilled": False,
                       "dropout": 0.0, "drop_path_rate": args.drop_path, "channels": enc.in_chans,
                       "decoder": decoder, "n_cls": args.n_cls},
        "amp": amp in ("bf16", "fp16"), "log_dir": args.log_dir,
        "inference_kwargs": {"im_size": args.eval_short_side, "window_size": args.window_size,
                             "window_stride": args.window_stride},
    }
    with atomic_write(os.path.join(args.log_dir, "variant.yml"), "w") as f:
        yaml.safe_dump(variant, f, sort_keys=False)
