"""Exports a pretrained encoder (any mask method, ours or an official MAE checkpoint) to where
encoders are used. The method is read from the checkpoint: a four_channels patch embedding is
folded into 3 channels (exact for a fully visible image), the pre-encoder and decoder are dropped.

    python tools/export.py --checkpoint out/checkpoint-799.pth --to timm --out export/timm
    python tools/export.py --checkpoint out/checkpoint-799.pth --to hf --out export/hf
    python tools/export.py --checkpoint out/checkpoint-799.pth --to hf-mae --out export/hf-mae   # patches only
    python tools/export.py --checkpoint out/checkpoint-799.pth --to encoder --out export/encoder

timm:    model.safetensors (no head: no classifier was trained) + config.json + README.md with the calls
         that load it, values filled in (printed too); for a ViT-B/16 pretrained at 224:
         timm.create_model('vit_base_patch16_224', patch_size=16, img_size=224, num_classes=0,
                           checkpoint_path='export/timm/model.safetensors'),
         at another img_size: pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=0)
         instead of checkpoint_path (num_classes=N: a new head). --timm_zero_head writes a zero
         1000-class head instead (the calls without num_classes)
hf:      a transformers ViTModel folder (save_pretrained) that loads whole: ViTModel.from_pretrained('export/hf')
         or AutoModel; pooler_output is the final [CLS] token (an identity pooler: MAE trains none), and
         preprocessor_config.json for AutoImageProcessor (the size and normalisation it was pretrained with)
hf-mae:  a transformers ViTMAEForPreTraining folder, decoder included (patches checkpoints)
encoder: checkpoint.pth = {'model': encoder weights} in the official MAE layout, which the original
         facebookresearch/mae main_finetune.py --finetune (and this repo's) accepts.

Every file is written into a temporary folder inside --out first and moved into --out only when all
are complete, config.json last: a full disk (or a kill) leaves the previous export as it was, never a
config.json without its weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_vit  # noqa: E402
from inputs.transforms import NORMALIZATIONS, as_hw  # noqa: E402
from mask_methods import get_method  # noqa: E402
from models_vit import describe_encoder, load_encoder, timm_name  # noqa: E402
from run.checkpoint import checkpoint_config, load_checkpoint  # noqa: E402
from run.files import (StorageError, atomic_torch_save, first_missing_folder, free_space,  # noqa: E402
                       remove_failed_start, writable_dir)
from run.flags import add_mask_channel_arg, parse_flags  # noqa: E402
from run.setup import run_tool  # noqa: E402
from util.misc import UserError  # noqa: E402

TARGETS = ("timm", "hf", "hf-mae", "encoder")


def build_timm_encoder(sd: dict, shape: dict, size) -> torch.nn.Module:
    """This repo's (timm) ViT with the encoder loaded, no head: the reference features."""
    model = models_vit.build_vit(timm_name(shape), img_size=as_hw(size), num_classes=0)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def timm_architecture(shape: dict) -> str:
    """The installed registry's name of this width and depth: this patch size at 224 where timm has
    it (vit_small_patch8_224), else its patch-16 model, patch and image size passed as model_args."""
    import timm
    ours = f"{timm_name(shape)}_224"
    return ours if ours in timm.list_models() else ours.replace(f"patch{shape['patch']}_", "patch16_")


def timm_calls(architecture: str, patch: int, size, file: str, zero_head: bool = False) -> dict[str, str]:
    """The timm.create_model calls that load this export, with every value filled in: the name alone
    carries neither the patch size nor the image size of a model other than ViT-X/16 at 224.
    checkpoint_path loads strictly, so only at the pretraining size; pretrained=True goes through
    timm's filter, which resizes the position embedding to any img_size."""
    h, w = as_hw(size)
    img = str(h) if h == w else f"({h}, {w})"
    head = "" if zero_head else "num_classes=0, "
    overlay = f"dict(file={file!r})" if zero_head else f"dict(file={file!r}, num_classes=0)"
    return {"at its size": f"timm.create_model({architecture!r}, patch_size={patch}, img_size={img}, {head}"
                           f"checkpoint_path={file!r})",
            "at another size": f"timm.create_model({architecture!r}, patch_size={patch}, img_size=224, "
                               f"pretrained=True, {head}pretrained_cfg_overlay={overlay})"}


def export_timm(sd: dict, shape: dict, size, out: str, zero_head: bool = False,
                normalization: str = "imagenet", file: str | None = None) -> list[str]:
    """No head by default: the calls of ``timm_calls`` load it strictly. zero_head: a zero
    1000-class head (no classifier was trained), for timm's default num_classes. file: the path of
    model.safetensors as the user will reach it (--out as given), for the calls in README.md."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    classes = 1000 if zero_head else 0
    if zero_head:
        tensors["head.weight"] = torch.zeros(1000, shape["embed_dim"])
        tensors["head.bias"] = torch.zeros(1000)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    h, w = as_hw(size)
    architecture = timm_architecture(shape)
    config = {"architecture": architecture, "model_args": {"patch_size": shape["patch"], "img_size": [h, w]},
              "num_classes": classes, "num_features": shape["embed_dim"],
              "global_pool": "token",
              "head": "zero (no classifier trained)" if zero_head else "none (no classifier trained): num_classes=0",
              "pretrained_cfg": {"input_size": [3, h, w], "num_classes": classes, "classifier": "head",
                                 "mean": list(NORMALIZATIONS[normalization][0]),
                                 "std": list(NORMALIZATIONS[normalization][1]),
                                 "interpolation": "bicubic", "crop_pct": 0.875}}
    calls = timm_calls(architecture, shape["patch"], (h, w), file or os.path.join(out, "model.safetensors"),
                       zero_head)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# MAE encoder for timm ({architecture} with patch {shape['patch']}, {h}x{w})\n\n"
                f"At the size it was pretrained at (strict load):\n\n```python\nimport timm\n"
                f"model = {calls['at its size']}\n```\n\nAt another size (timm resizes the position "
                f"embedding; `num_classes=N` there: a new head):\n\n```python\n"
                f"model = {calls['at another size']}\n```\n\nThe name alone does not carry the patch "
                f"and image size: config.json's `model_args` holds them.\n")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return [os.path.join(out, n) for n in ("model.safetensors", "README.md", "config.json")]


# ------------------------------------------------------------------------------------------------
# transformers: module names differ between releases (4.x: encoder.layer.i.attention.attention.query,
# 5.x: layers.i.attention.q_proj); each weight is mapped to the name the installed model has.

_BLOCK_PARTS = {  # timm block part -> candidate transformers names (5.x first, then 4.x)
    "norm1": ["layernorm_before"],
    "norm2": ["layernorm_after"],
    "attn.proj": ["attention.o_proj", "attention.output.dense"],
    "mlp.fc1": ["mlp.fc1", "intermediate.dense"],
    "mlp.fc2": ["mlp.fc2", "output.dense"],
}
_QKV = {"q": ["attention.q_proj", "attention.attention.query"], "k": ["attention.k_proj", "attention.attention.key"],
        "v": ["attention.v_proj", "attention.attention.value"]}


def _pick(candidates: list[str], target: set) -> str:
    for c in candidates:
        if c + ".weight" in target or c in target:
            return c
    raise UserError(f"the installed transformers has none of {candidates}: update tools/export.py's name map")


def blocks_to_hf(sd: dict, prefix: str, block_prefixes: list[str], target: set, out: dict, ours: str = "blocks") -> None:
    """timm-style transformer blocks (`ours`.i.*) into transformers' layers under one of block_prefixes."""
    depth = len({k.split(".")[1] for k in sd if k.startswith(ours + ".")})
    layer = next((p for p in block_prefixes if any(k.startswith(f"{prefix}{p}.0.") for k in target)), None)
    if layer is None:
        raise UserError(f"the installed transformers has no {prefix}{block_prefixes} layers")
    for i in range(depth):
        src, dst = f"{ours}.{i}.", f"{prefix}{layer}.{i}."
        layer_keys = {k[len(dst):] for k in target if k.startswith(dst)}
        for part, names in _BLOCK_PARTS.items():
            name = _pick(names, layer_keys)
            for t in ("weight", "bias"):
                out[f"{dst}{name}.{t}"] = sd[f"{src}{part}.{t}"]
        for t in ("weight", "bias"):
            for chunk, which in zip(sd[f"{src}attn.qkv.{t}"].chunk(3, dim=0), "qkv"):
                out[f"{dst}{_pick(_QKV[which], layer_keys)}.{t}"] = chunk


def encoder_to_hf(sd: dict, prefix: str, target: set) -> dict:
    out = {f"{prefix}embeddings.cls_token": sd["cls_token"],
           f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
           f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           f"{prefix}layernorm.weight": sd["norm.weight"], f"{prefix}layernorm.bias": sd["norm.bias"]}
    blocks_to_hf(sd, prefix, ["layers", "encoder.layer"], target, out)
    return out


def _load_exactly(model: torch.nn.Module, weights: dict) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")


class _EnumRegistrationNotice(logging.Filter):
    """torchao, which transformers imports when it is installed, registers its enums with torch's
    pytree at import; recent torch logs a deprecation warning for each (nothing we can act on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


@contextlib.contextmanager
def _quiet_transformers_import():
    pytree_log, notice = logging.getLogger("torch.utils._pytree"), _EnumRegistrationNotice()
    pytree_log.addFilter(notice)
    try:
        yield
    finally:
        pytree_log.removeFilter(notice)


def identity_pooler(dim: int) -> dict:
    """transformers' ViTModel always builds a pooler (dense + activation on the [CLS] token), which
    MAE never trained: an identity dense with the 'linear' activation makes pooler_output exactly the
    final [CLS] token (MAE's token pooling), so the folder loads whole, nothing newly initialised."""
    return {"pooler.dense.weight": torch.eye(dim), "pooler.dense.bias": torch.zeros(dim)}


def export_hf(sd: dict, shape: dict, size, out: str, normalization: str = "imagenet") -> list[str]:
    with _quiet_transformers_import():
        from transformers import ViTConfig, ViTImageProcessor, ViTModel
    h, w = as_hw(size)
    if h != w:
        raise UserError(f"transformers' ViT takes a square image_size; this encoder was trained at {h}x{w}")
    config = ViTConfig(hidden_size=shape["embed_dim"], num_hidden_layers=shape["depth"],
                       num_attention_heads=shape["heads"], intermediate_size=shape["mlp"], image_size=h,
                       patch_size=shape["patch"], num_channels=3, qkv_bias=True, hidden_act="gelu",
                       layer_norm_eps=1e-6,  # MAE's LayerNorm eps (transformers' default 1e-12 moves outputs)
                       pooler_act="linear")
    model = ViTModel(config, add_pooling_layer=True)
    weights = encoder_to_hf(sd, "", set(model.state_dict()))
    weights.update(identity_pooler(shape["embed_dim"]))
    _load_exactly(model, weights)
    model.save_pretrained(out, safe_serialization=True)
    mean, std = NORMALIZATIONS[normalization]
    # the evaluation transform of the recipe it was pretrained with: bicubic resize to its size, 0-1, normalised
    ViTImageProcessor(do_resize=True, size={"height": h, "width": w}, resample=3, do_rescale=True,
                      rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean),
                      image_std=list(std)).save_pretrained(out)
    return sorted(os.path.join(out, f) for f in os.listdir(out))


def export_hf_mae(full: dict, sd: dict, shape: dict, size, method: str, out: str) -> list[str]:
    with _quiet_transformers_import():
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    if not get_method(method).drops_tokens:
        raise UserError(f"hf-mae exports the whole MAE, which transformers implements for random patches only; this "
                        f"checkpoint is {method}: export the encoder with --to hf")
    if "decoder_embed.weight" not in full:
        raise UserError("this checkpoint holds no decoder (an encoder-only checkpoint): export it with --to hf")
    h, w = as_hw(size)
    dec_dim = full["decoder_embed.weight"].shape[0]
    dec_depth = len({k.split(".")[1] for k in full if k.startswith("decoder_blocks.")})
    dec_heads = {128: 4, 256: 8, 512: 16}.get(dec_dim, 16)
    config = ViTMAEConfig(hidden_size=shape["embed_dim"], num_hidden_layers=shape["depth"],
                          num_attention_heads=shape["heads"], intermediate_size=shape["mlp"], image_size=h,
                          patch_size=shape["patch"], num_channels=3, qkv_bias=True, decoder_hidden_size=dec_dim,
                          decoder_num_hidden_layers=dec_depth, decoder_num_attention_heads=dec_heads,
                          decoder_intermediate_size=full["decoder_blocks.0.mlp.fc1.weight"].shape[0],
                          layer_norm_eps=1e-6, mask_ratio=0.75, hidden_act="gelu")
    model = ViTMAEForPreTraining(config)
    target = set(model.state_dict())
    weights = encoder_to_hf(sd, "vit.", target)
    dec = {k: v for k, v in full.items() if k.startswith("decoder_")}
    for ours, theirs in (("mask_token", "decoder.mask_token"), ("decoder_pos_embed", "decoder.decoder_pos_embed")):
        weights[theirs] = full[ours]
    for part in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for t in ("weight", "bias"):
            weights[f"decoder.{part}.{t}"] = full[f"{part}.{t}"]
    blocks_to_hf(dec, "decoder.", ["decoder_layers", "decoder_layers"], target, weights, ours="decoder_blocks")
    _load_exactly(model, weights)
    model.save_pretrained(out, safe_serialization=True)
    return sorted(os.path.join(out, f) for f in os.listdir(out))


def export_encoder(sd: dict, out: str) -> list[str]:
    """The official MAE checkpoint layout (pickle: the original code reads it with torch.load)."""
    path = os.path.join(out, "checkpoint.pth")
    atomic_torch_save({"model": {k: v.contiguous() for k, v in sd.items()}}, path)
    return [path]


_STAGING = re.compile(r"^\.export\.tmp(\d+)$")  # a folder of files being written, inside --out


def _failed_write(e: BaseException) -> bool:
    """A write that failed (full disk, quota, I/O error), as the writers report it: an OSError,
    safetensors' 'I/O error ... (os error 28)', torch's zip writer's RuntimeError."""
    return isinstance(e, OSError) or any(s in str(e) for s in ("I/O error", "os error", "No space left",
                                                                "PytorchStreamWriter", "file write failed"))


def _remove_stale_staging(out: str) -> None:
    """Temporary folders of exports that were killed (their process is gone)."""
    for name in os.listdir(out):
        match = _STAGING.match(name)
        if match and os.path.isdir(os.path.join(out, name)):
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            except PermissionError:  # another user's live process
                pass


def _publish(staging: str, out: str) -> list[str]:
    """Moves every file written in staging into out, the JSON files (config.json: what makes a
    folder loadable) last; returns their paths in out."""
    names = sorted(os.listdir(staging), key=lambda n: (n.endswith(".json"), n == "config.json", n))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    return sorted(os.path.join(out, n) for n in names)


def export(checkpoint: str, to: str, out: str, mask_channel: str = "auto", timm_zero_head: bool = False) -> list[str]:
    ckpt = load_checkpoint(checkpoint)
    sd, full, method, size, shape = load_encoder(checkpoint, ckpt, mask_channel=mask_channel)
    print(f"{checkpoint}: {method} encoder, {describe_encoder(sd)}, input {size[0]}x{size[1]}")
    created = first_missing_folder(out)  # removed again when the export is refused or fails
    writable_dir(out, "--out")
    _remove_stale_staging(out)
    staging = os.path.join(out, f".export.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(staging)
        normalization = checkpoint_config(ckpt).get("normalization") or "imagenet"  # as it was pretrained
        if to == "timm":
            export_timm(sd, shape, size, staging, timm_zero_head, normalization,
                        file=os.path.join(out, "model.safetensors"))
        elif to == "hf":
            export_hf(sd, shape, size, staging, normalization)
        elif to == "hf-mae":
            export_hf_mae(full, sd, shape, size, method, staging)
        else:
            export_encoder(sd, staging)
        files = _publish(staging, out)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            remove_failed_start([created])
        if isinstance(e, StorageError):  # atomic_torch_save's, naming the temporary folder's file
            reason = str(e).split(": ", 1)[-1]
        elif _failed_write(e):
            reason = f"{(e.strerror or str(e)) if isinstance(e, OSError) else e} ({free_space(out)} there)"
        else:
            raise
        raise StorageError(f"could not write the {to} export into {out}: {reason}; nothing in {out} was changed. "
                           f"Free some space (or pass another --out) and run again") from None
    print("wrote " + ", ".join(files))
    if to == "timm":
        calls = timm_calls(timm_architecture(shape), shape["patch"], size, os.path.join(out, "model.safetensors"),
                           timm_zero_head)
        print(f"load it with timm (README.md there has the call at another size):\n  {calls['at its size']}")
    return files


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint of any method, or an official one")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--timm_zero_head", action="store_true",
                   help="--to timm: write a zero 1000-class head (default: no head; load with num_classes=0)")
    add_mask_channel_arg(p)
    args = parse_flags(p, argv)
    return export(args.checkpoint, args.to, args.out, args.mask_channel, args.timm_zero_head)


if __name__ == "__main__":
    run_tool(main)
