"""Segmenter (Strudel et al., ICCV 2021): a ViT encoder and a linear or mask-transformer decoder.

The encoder is models_vit's ViT (timm's), loaded from any of our pretraining checkpoints through
models_vit.py; its position embeddings are resized bilinearly (as Segmenter's, where
timm would use antialiased bicubic) to the crop size when loading and on the fly for other input
sizes (sliding windows, whole images). The encoder keeps MAE's LayerNorm eps 1e-6; the decoder has
Segmenter's: eps 1e-5, dropout 0.1 on attention weights and projections in the mask transformer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

import models_vit
from util.pos_embed import resize_pos_embed

BACKBONES = tuple(models_vit.MODEL_NAMES)  # every registered ViT (an image is padded to its patch size)
DECODERS = ("linear", "mask_transformer")


class DecoderLinear(nn.Module):
    """Per-patch linear classifier."""

    def __init__(self, n_cls: int, d_encoder: int):
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(d_encoder, n_cls)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.head(x)  # (N, L, n_cls)
        return x.transpose(1, 2).reshape(x.shape[0], self.n_cls, *grid)


class MaskTransformer(nn.Module):
    """Learned class embeddings go through transformer blocks jointly with the patch tokens; the
    masks are scalar products of L2-normalised patch and class projections, then LayerNorm'd over
    classes ("mask norm")."""

    def __init__(self, n_cls: int, d_encoder: int, n_layers: int = 2, d_model: int | None = None,
                 n_heads: int | None = None, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 dropout: float = 0.1):
        super().__init__()
        d_model = d_model or d_encoder
        n_heads = n_heads or max(1, d_model // 64)
        self.n_cls = n_cls
        self.scale = d_model ** -0.5
        self.proj_dec = nn.Linear(d_encoder, d_model)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, n_layers)]
        self.blocks = nn.ModuleList([
            Block(d_model, n_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  drop_path=dpr[i], norm_layer=nn.LayerNorm)  # torch's eps 1e-5 (timm's LayerNorm: 1e-6)
            for i in range(n_layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)
        self.apply(self._init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.proj_dec(x)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, :-self.n_cls], x[:, -self.n_cls:]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (N, L, n_cls)
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, *grid)


class SegmenterEncoder(models_vit.VisionTransformer):
    """The ViT with Segmenter's position-embedding resizing: bilinear, no antialiasing."""
    pos_embed_resize_mode = "bilinear"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape  # dynamic_img_size: patch tokens come as a grid
        pos = resize_pos_embed(self.pos_embed, tuple(self.patch_embed.grid_size), (h, w), self.num_prefix_tokens,
                               mode=self.pos_embed_resize_mode)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return self.pos_drop(x + pos)


class Segmenter(nn.Module):
    def __init__(self, encoder: models_vit.VisionTransformer, decoder: nn.Module, n_cls: int):
        super().__init__()
        self.encoder, self.decoder, self.n_cls = encoder, decoder, n_cls
        self.patch_size = encoder.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, n_cls, H, W); any H, W (padded to the patch size inside)."""
        h, w = x.shape[-2:]
        p = self.patch_size
        pad_h, pad_w = (p - h % p) % p, (p - w % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        masks = self.decoder(tokens, grid)
        masks = F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return masks[..., :h, :w]


def build_segmenter(backbone: str, decoder: str, n_cls: int, crop_size: int | tuple[int, int],
                    channels: int = 3, drop_path_rate: float = 0.1) -> Segmenter:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    encoder = models_vit.build_vit(backbone, img_size=crop_size, num_classes=0, global_pool=False,
                                   in_chans=channels, drop_path_rate=drop_path_rate, dynamic_img_size=True,
                                   vit_class=SegmenterEncoder)
    d = encoder.embed_dim
    head = DecoderLinear(n_cls, d) if decoder == "linear" else MaskTransformer(n_cls, d, n_layers=2)
    return Segmenter(encoder, head, n_cls)
