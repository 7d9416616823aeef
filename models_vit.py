"""ViT for finetuning, linear probing and segmentation: timm's VisionTransformer, so state-dict keys
are timm's (a finetuned model loads into ``timm.create_model('vit_base_patch16_224',
global_pool='avg')`` with strict=True).

``global_pool=True`` (the MAE reference's default for finetuning) averages the patch tokens and
normalises them with ``fc_norm``; ``False`` uses the class token after ``norm``.
``in_chans=4`` builds the encoder of a ``four_channels`` checkpoint without folding: it is fed the
image plus a constant-1 visibility channel, appended here when a 3-channel image comes in.

Below the registry: how a pretraining checkpoint (any mask method, ours or the reference's, or an
official MAE encoder) becomes such an encoder, for finetuning, linear probing, the Segmenter, kNN,
exports and torch.hub, and how an official encoder seeds an MAE for continued pretraining
(--stack). Which codebase a checkpoint comes from is run/checkpoint.py's checkpoint_origin.

- The pretraining method is read from the checkpoint's ``args``; official checkpoints (no args)
  count as ``patches``. A requested method that disagrees is an error naming both.
- Decoder, mask token and pre-encoder weights are dropped.
- ``four_channels``: the 4-channel patch embedding is kept (the downstream model is fed a
  constant-1 fourth channel) or folded exactly into a 3-channel one: with the 4th input constantly
  1, its kernel only adds ``sum(W[:, 3])`` to the bias.
- Position embeddings are bicubically resized to the downstream patch grid.
- An encoder of another shape is refused with a message saying which model it fits.
- Checkpoints of the original segmae code (DeinAlptraum/mae) keep their meaning: its
  ``four_channels`` feeds the segment ``m`` (1 = hidden) as the 4th channel where this repo feeds
  ``v = 1 - m``, so its patch embedding is converted exactly (W_v = -W_m, bias += sum of W_m over
  the kernel); its ``preencoder`` checkpoints (a ``CombinedModel``: ``model.*`` the MAE,
  ``encoder.*`` a Conv2d(4, 3, 16, padding 'same')) give their MAE's encoder, the pre-encoder
  dropped as the original does. This repo's checkpoints say their convention (``fourth_channel``).
"""
from __future__ import annotations

import math
from functools import partial

import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn

from mask_methods import MASK_METHODS, get_method
from run.checkpoint import (FOURTH_CHANNEL_KEY, PREENCODER_NOT_CONTINUABLE, AdaptationError, CheckpointError,
                            check_unchanged, checkpoint_config, checkpoint_origin, first_nonfinite, is_segmae_combined,
                            load_checkpoint, state_dict_of)
from util.pos_embed import resize_pos_embed


class VisionTransformer(timm_vit.VisionTransformer):
    def __init__(self, global_pool: bool = False, in_chans: int = 3, **kwargs):
        super().__init__(global_pool="avg" if global_pool else "token", in_chans=in_chans, **kwargs)
        self.in_chans = in_chans

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def add_visibility_channel(self, x: torch.Tensor) -> torch.Tensor:
        """An encoder with mask channels downstream sees nothing hidden: they are constantly 1."""
        if self.in_chans > 3 and x.shape[1] == 3:
            x = torch.cat([x, x.new_ones(x.shape[0], self.in_chans - 3, x.shape[2], x.shape[3])], dim=1)
        return x

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward_features(self.add_visibility_channel(x), *args, **kwargs)


def _vit(defaults: dict, kwargs: dict) -> VisionTransformer:
    """kwargs may name a subclass to build (vit_class=...), e.g. the Segmenter's encoder."""
    cfg = dict(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(defaults)
    cfg.update(kwargs)
    vit_class = cfg.pop("vit_class", VisionTransformer)
    return vit_class(**cfg)


_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_HUGE = dict(embed_dim=1280, depth=32, num_heads=16)


def vit_tiny_patch16(**kwargs):
    return _vit(dict(_TINY, patch_size=16), kwargs)


def vit_tiny_patch8(**kwargs):
    return _vit(dict(_TINY, patch_size=8), kwargs)


def vit_tiny_patch4(**kwargs):
    return _vit(dict(_TINY, patch_size=4), kwargs)


def vit_small_patch16(**kwargs):
    return _vit(dict(_SMALL, patch_size=16), kwargs)


def vit_small_patch8(**kwargs):
    return _vit(dict(_SMALL, patch_size=8), kwargs)


def vit_small_patch4(**kwargs):
    return _vit(dict(_SMALL, patch_size=4), kwargs)


def vit_base_patch4(**kwargs):
    """Union14M's ViT-B/4 (text lines, 32 x 128)."""
    return _vit(dict(_BASE, patch_size=4), kwargs)


def vit_base_patch16(**kwargs):
    return _vit(dict(_BASE, patch_size=16), kwargs)


def vit_base_patch8(**kwargs):
    return _vit(dict(_BASE, patch_size=8), kwargs)


def vit_large_patch16(**kwargs):
    return _vit(dict(_LARGE, patch_size=16), kwargs)


def vit_huge_patch14(**kwargs):
    return _vit(dict(_HUGE, patch_size=14), kwargs)


MODEL_NAMES = sorted(n for n, f in list(globals().items()) if n.startswith("vit_") and callable(f))


def own_model_name(name: str) -> tuple[str, str]:
    """(this repo's name, a note saying so) for a name of another codebase's downstream ViT:
    MAE-pytorch's vit_{small,base,large}_patch16_224, or a pretraining model's (mae_vit_base_patch16,
    whose encoder this ViT is); (name, '') for any other."""
    for size in ("small", "base", "large"):
        if name == f"vit_{size}_patch16_224":
            return f"vit_{size}_patch16", f"--model {name} is MAE-pytorch's name: this repo's is vit_{size}_patch16"
    encoder = name[len("mae_"):].split("_dec")[0] if name.startswith("mae_vit_") else ""
    if encoder in MODEL_NAMES:
        return encoder, (f"--model {name} names the pretraining model (with its decoder): this command builds its "
                         f"encoder, {encoder}")
    return name, ""
ARCHITECTURES = {"tiny": _TINY, "small": _SMALL, "base": _BASE, "large": _LARGE, "huge": _HUGE}


def check_registered(name: str, names: list[str]) -> str:
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names)}")
    return name


def default_input_size(name: str) -> list[int]:
    """--input_size when none is given (and none is recorded in the --finetune checkpoint): 32 x 128
    for Union14M's ViT-B/4, else 224."""
    return [32, 128] if name == "vit_base_patch4" else [224]


def build_vit(name: str, **kwargs) -> VisionTransformer:
    return globals()[check_registered(name, MODEL_NAMES)](**kwargs)


def model_patch_size(name: str) -> int:
    """Patch size of a registered model, without building it: 'vit_base_patch16' -> 16."""
    return int(check_registered(name, MODEL_NAMES).split("_patch")[1].split("_")[0])


def name_for(embed_dim: int, depth: int, patch_size: int) -> str | None:
    """The registry name of an encoder shape, e.g. (768, 12, 16) -> 'vit_base_patch16'."""
    for size, arch in ARCHITECTURES.items():
        if arch["embed_dim"] == embed_dim and arch["depth"] == depth:
            name = f"vit_{size}_patch{patch_size}"
            return name if name in MODEL_NAMES else None
    return None


# ------------------------------------------------------------------------------------------------
# a pretraining checkpoint -> the encoder of a downstream model

PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token", "preencoder.")


def is_pretraining_checkpoint(checkpoint: dict) -> bool:
    """A pretraining checkpoint (an MAE with its decoder, the original segmae code's pre-encoder
    model, or an official encoder-only file), not one that finetuning or linear probing wrote (those
    hold a classification head)."""
    sd = state_dict_of(checkpoint)
    if is_segmae_combined(sd) or any(k.startswith(PRETRAIN_ONLY_PREFIXES) for k in sd):
        return True
    return "patch_embed.proj.weight" in sd and not any(k.startswith("head.") for k in sd)


def downstream_name(checkpoint: dict) -> str | None:
    """The registry name of the downstream ViT a pretraining checkpoint's encoder fits, if any."""
    sd = state_dict_of(checkpoint)
    if is_segmae_combined(sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    w, cls = sd.get("patch_embed.proj.weight"), sd.get("cls_token")
    if w is None or cls is None:
        return None
    return name_for(cls.shape[-1], len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), w.shape[-1])


def pretrain_mask_method(checkpoint: dict) -> str:
    """The mask method a checkpoint was pretrained with ('patches' for official/reference ones)."""
    return checkpoint_config(checkpoint).get("mask_method") or "patches"


def resolve_mask_method(checkpoint: dict, requested: str | None, path: str = "the checkpoint") -> str:
    """The checkpoint's method; a --mask_method flag that disagrees is an error naming both."""
    method = pretrain_mask_method(checkpoint)
    if method not in MASK_METHODS:
        raise AdaptationError(f"{path} records an unknown mask_method {method!r}")
    if requested is not None and requested != method:
        raise AdaptationError(f"--mask_method {requested} disagrees with {path}, which was pretrained with "
                              f"--mask_method {method}: drop the flag or pass --mask_method {method}")
    return method


def fourth_channel(checkpoint: dict, declared: str = "auto", path: str = "the checkpoint") -> str:
    """What a checkpoint's 4th input channel holds: 'visible' (v = 1 - m) or 'hidden' (m). A
    declared value (--mask_channel) is used where the checkpoint does not say; one that
    contradicts the checkpoint's own record is an error."""
    recorded = checkpoint_config(checkpoint).get(FOURTH_CHANNEL_KEY)
    if declared not in (None, "auto"):
        if recorded is not None and recorded != declared:
            raise AdaptationError(f"--mask_channel {declared} contradicts {path}, which records that its 4th channel "
                                  f"is {recorded}: leave the flag out")
        return declared
    if recorded is not None:
        return recorded
    return "hidden" if checkpoint_origin(checkpoint) == "segmae" else "visible"


def hidden_to_visible(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-channel patch embedding fed m (1 = hidden) -> the same function fed v = 1 - m: with
    W_m * m = W_m * (1 - v) = sum(W_m) - W_m * v, W_v = -W_m and bias += sum of W_m."""
    weight = weight.clone()
    bias = bias + weight[:, 3].sum(dim=(1, 2))
    weight[:, 3] = -weight[:, 3]
    return weight, bias


def mae_state_dict(checkpoint: dict, path: str = "the checkpoint", mask_channel: str = "auto") -> dict:
    """A pretraining checkpoint's full MAE weights in this repo's conventions (an original segmae
    four_channels patch embedding converted to the visibility channel)."""
    sd = dict(state_dict_of(checkpoint))
    if is_segmae_combined(sd):
        raise AdaptationError(f"{path} is a preencoder checkpoint of the original segmae code: "
                              + PREENCODER_NOT_CONTINUABLE)
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 4 and w.shape[1] == 4 and fourth_channel(checkpoint, mask_channel, path) == "hidden":
        sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = hidden_to_visible(w, sd["patch_embed.proj.bias"])
        print(f"{path}: 4th channel converted from the original segmae convention (m, 1 = hidden) to this repo's "
              f"(v = 1 - m): W_v = -W_m, bias += sum(W_m); same outputs")
    return sd


def downstream_in_chans(mask_method: str, fold_mask_channel: bool) -> int:
    """Input channels of the downstream encoder for a pretraining method."""
    return get_method(mask_method).downstream_in_chans(fold_mask_channel)


def fold_visibility_channel(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, 4, p, p) conv + bias -> (D, 3, p, p) conv + bias, exact for a constant-1 4th input."""
    return get_method("four_channels").adapt_patch_embed(weight, bias, fold_mask_channel=True)


def patch_grid(num_patches: int, checkpoint: dict) -> tuple[int, int]:
    """The (rows, cols) patch grid of a checkpoint's position embedding with num_patches patches."""
    size, patch = checkpoint_config(checkpoint).get("input_size"), None
    sd = state_dict_of(checkpoint)
    if "patch_embed.proj.weight" in sd:
        patch = sd["patch_embed.proj.weight"].shape[-1]
    if size is not None and patch:
        h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
        if (h // patch) * (w // patch) == num_patches:
            return h // patch, w // patch
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise AdaptationError(f"cannot infer the patch grid of a position embedding with {num_patches} patches")
    return side, side


def describe_encoder(sd: dict, flag: str = "--model", prefix: str = "") -> str:
    """'embed_dim 768, 12 blocks, patch 16, 3 input channels (fits --model vit_base_patch16)'; ``flag``:
    the command's flag for the encoder (the Segmenter's --backbone), ``prefix``: 'mae_' for pretraining."""
    dim = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    w = sd.get("patch_embed.proj.weight")
    patch, chans = (w.shape[-1], w.shape[1]) if w is not None else (None, None)
    name = name_for(dim, depth, patch) if dim and patch else None
    fits = f" (fits {flag} {prefix}{name})" if name else ""
    return f"embed_dim {dim}, {depth} blocks, patch {patch}, {chans} input channels{fits}"


def encoder_state_dict(checkpoint: dict, mask_method: str, fold_mask_channel: bool = True,
                       mask_channel: str = "auto", path: str = "the checkpoint") -> dict:
    """The checkpoint's encoder weights, ready for a downstream ViT (before pos-embed resizing)."""
    sd = state_dict_of(checkpoint)
    if is_segmae_combined(sd):
        print(f"{path}: a preencoder checkpoint of the original segmae code; its MAE's encoder is used and the "
              f"pre-encoder dropped, as the original does downstream")
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        checkpoint = {**checkpoint, "model": sd}
    sd = {k: v for k, v in mae_state_dict(checkpoint, path, mask_channel).items()
          if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
    w = sd.get("patch_embed.proj.weight")
    if w is not None and mask_method in MASK_METHODS:
        sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = get_method(mask_method).adapt_patch_embed(
            w, sd["patch_embed.proj.bias"], fold_mask_channel)
    return sd


def check_encoder_fits(sd: dict, model: nn.Module, path: str, flag: str = "--model", prefix: str = "") -> None:
    """Refuses an encoder whose width, depth, patch size or channels differ from the model's, naming
    the value of the command's ``flag`` (``prefix`` + registry name) it fits."""
    own = model.state_dict()
    problems = []
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            problems.append(f"{key} {tuple(sd[key].shape)} vs {tuple(own[key].shape)}")
    depth_ckpt = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    depth_model = len({k.split(".")[1] for k in own if k.startswith("blocks.")})
    if depth_ckpt != depth_model:
        problems.append(f"{depth_ckpt} blocks vs {depth_model}")
    if problems:
        raise AdaptationError(f"{path} holds an encoder with {describe_encoder(sd, flag, prefix)}, which does not "
                              f"fit this model ({describe_encoder(own, flag, prefix)}): " + "; ".join(problems))


def refuse_nonfinite(weights: dict, path: str) -> None:
    """A checkpoint used for its weights (finetuning, probing, the Segmenter, kNN, exports, --stack)
    must hold finite ones: the first NaN / inf tensor is named (a run that diverged before this
    repo refused to save such weights, or a damaged file)."""
    bad = first_nonfinite(weights)
    if bad is not None:
        raise CheckpointError(f"{path} holds non-finite weights (NaN/inf in '{bad}'): nothing can be learnt or "
                              f"measured from it. Use an earlier checkpoint of its run")


def resize_pos_embed_to(model: nn.Module, sd: dict, checkpoint: dict) -> None:
    """Resize of sd['pos_embed'] to the model's patch grid (in place): bicubic, or the model's own
    ``pos_embed_resize_mode`` (the Segmenter's encoder: bilinear)."""
    if "pos_embed" not in sd:
        return
    pos = sd["pos_embed"]
    extra = model.pos_embed.shape[1] - model.patch_embed.num_patches
    old_grid = patch_grid(pos.shape[1] - extra, checkpoint)
    new_grid = tuple(model.patch_embed.grid_size)
    if old_grid != new_grid:
        print(f"Position embedding interpolated from {old_grid[0]}x{old_grid[1]} to {new_grid[0]}x{new_grid[1]}")
        sd["pos_embed"] = resize_pos_embed(pos, old_grid, new_grid, num_extra_tokens=extra,
                                           mode=getattr(model, "pos_embed_resize_mode", "bicubic"))


def load_pretrained_encoder(model: nn.Module, path: str, mask_method: str | None = None,
                            fold_mask_channel: bool = True, checkpoint: dict | None = None,
                            mask_channel: str = "auto", flag: str = "--model"):
    """Loads a pretraining checkpoint's encoder into a downstream ViT (non-strict: the head and,
    with global pooling, fc_norm are new). Prints and returns (missing, unexpected) keys. ``flag``:
    the command's flag that chooses the ViT, named where the encoder does not fit."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path)
    method = resolve_mask_method(checkpoint, mask_method, path)
    sd = encoder_state_dict(checkpoint, method, fold_mask_channel, mask_channel, path)
    refuse_nonfinite(sd, path)
    check_encoder_fits(sd, model, path, flag)
    resize_pos_embed_to(model, sd, checkpoint)
    own = model.state_dict()
    for key in [k for k in ("head.weight", "head.bias") if k in sd and sd[k].shape != own.get(k, sd[k]).shape]:
        print(f"Removing key {key} from pretrained checkpoint (other number of classes)")
        del sd[key]
    if getattr(model, "global_pool", None) == "avg":
        # the pretrained final norm has no place behind average pooling (fc_norm is new)
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    check_unchanged(path)  # the weights were read from the file as they were copied
    print(f"Loaded {method} encoder from {path}; missing keys: {sorted(missing)}; unexpected keys: {sorted(unexpected)}")
    return method, missing, unexpected


def encoder_shape(sd: dict) -> dict:
    """embed_dim, depth, heads (from the ViT registry's architectures), patch size, mlp width of an encoder."""
    w = sd["patch_embed.proj.weight"]
    embed_dim, depth = w.shape[0], len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads = next((a["num_heads"] for a in ARCHITECTURES.values()
                  if a["embed_dim"] == embed_dim and a["depth"] == depth), None)
    if heads is None:
        raise AdaptationError(f"no registered ViT has embed_dim {embed_dim} and {depth} blocks: the number of attention "
                        f"heads is unknown")
    return {"embed_dim": embed_dim, "depth": depth, "heads": heads, "patch": w.shape[-1],
            "mlp": sd["blocks.0.mlp.fc1.weight"].shape[0], "in_chans": w.shape[1]}


def load_encoder(path: str, checkpoint: dict | None = None,
                 mask_channel: str = "auto") -> tuple[dict, dict, str, tuple[int, int], dict]:
    """(encoder state dict, full state dict, mask method, input size, shape) of a checkpoint
    (``checkpoint``: the file already loaded)."""
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(path)
    method = pretrain_mask_method(ckpt)
    sd = encoder_state_dict(ckpt, method, fold_mask_channel=True, mask_channel=mask_channel, path=path)
    if "patch_embed.proj.weight" not in sd:
        raise AdaptationError(f"{path} holds no ViT encoder (no patch_embed.proj.weight)")
    gh, gw = patch_grid(sd["pos_embed"].shape[1] - 1, ckpt)  # the size it was trained at
    patch = sd["patch_embed.proj.weight"].shape[-1]
    full = state_dict_of(ckpt)
    if is_segmae_combined(full):  # the original's preencoder: its MAE, the pre-encoder dropped
        full = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    else:
        full = mae_state_dict(ckpt, path, mask_channel)
    refuse_nonfinite(full, path)  # reads every tensor of the file
    check_unchanged(path)
    return sd, full, method, (gh * patch, gw * patch), encoder_shape(sd)


def timm_name(shape: dict) -> str:
    name = name_for(shape["embed_dim"], shape["depth"], shape["patch"])
    if name is None:
        raise AdaptationError(f"no timm model has this encoder's shape ({shape})")
    return name


def stack_official_into_mae(mae: nn.Module, path: str, mask_channel: str = "auto") -> None:
    """--stack: an official (or any patches-pretrained) MAE encoder into an MAE of any method.

    A 4-channel patch embedding gets the official RGB kernel and a zero mask-channel kernel; the
    pre-encoder stays at identity; the decoder keeps its fresh initialisation unless the
    checkpoint has one. With a zero mask channel the first forward equals the official model's."""
    checkpoint = load_checkpoint(path)
    sd = mae_state_dict(checkpoint, path, mask_channel)
    sd = {k: v for k, v in sd.items() if not k.startswith("preencoder.")}
    refuse_nonfinite(sd, path)
    own = mae.state_dict()
    w = sd.get("patch_embed.proj.weight")
    if w is not None:
        sd["patch_embed.proj.weight"] = mae.method.stack_patch_embed(w, own["patch_embed.proj.weight"].shape[1])
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    check_encoder_fits(encoder_only, mae, path, prefix="mae_")
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd and sd[key].shape != own[key].shape:
            del sd[key]  # fixed sin-cos tables: the model's own are right for its grid
    missing, unexpected = mae.load_state_dict(sd, strict=False)
    check_unchanged(path)
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc_norm."))]
    if unexpected:
        raise AdaptationError(f"--stack {path} has weights this MAE does not know: {unexpected[:5]}")
    print(f"Stacked {path} into the MAE; kept fresh: {sorted(missing)}")
