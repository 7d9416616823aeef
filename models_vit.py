"""ViT for finetuning, linear probing and segmentation: timm's VisionTransformer, so state-dict keys
are timm's (a finetuned model loads into ``timm.create_model('vit_base_patch16_224',
global_pool='avg')`` with strict=True).

``global_pool=True`` (the MAE reference's default for finetuning) averages the patch tokens and
normalises them with ``fc_norm``; ``False`` uses the class token after ``norm``.
``in_chans=4`` builds the encoder of a ``four_channels`` checkpoint without folding: it is fed the
image plus a constant-1 visibility channel, appended here when a 3-channel image comes in.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import timm.models.vision_transformer as timm_vit


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
