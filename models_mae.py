"""Masked autoencoder ViT with the paper's random-patch masking and three SAM-segment methods.

Parameter names are the facebookresearch/mae reference's, so its checkpoints load as they are.
What the encoder sees, which tokens it keeps and what the loss weighs are the mask method's
(mask_methods.py: one class per method); the model asks it.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from mask_methods import SEG_LOSSES, MaskMethod, get_method, method_class
from models_vit import ARCHITECTURES, check_registered
from util.pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT backbone.

    ``in_chans`` is the number of image channels (the reconstruction target). The encoder's patch
    embedding takes one more channel with ``mask_method="four_channels"``; see
    ``self.encoder_in_chans``. ``img_size`` may be an int or an ``(H, W)`` pair. ``mask_method`` is
    a method's name (its parameters at their defaults; ``seg_loss`` sets that one) or a
    mask_methods.MaskMethod built from the flags.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False,
                 mask_method: str | MaskMethod = "patches", grad_checkpointing: bool = False,
                 seg_loss: str | None = None):
        super().__init__()
        if seg_loss is not None and seg_loss not in SEG_LOSSES:
            raise ValueError(f"unknown seg_loss {seg_loss!r}; choose one of {', '.join(SEG_LOSSES)}")
        if isinstance(mask_method, str):
            has_seg_loss = "seg_loss" in {f.name for f in method_class(mask_method).flags}
            mask_method = get_method(mask_method, **({"seg_loss": seg_loss} if seg_loss and has_seg_loss else {}))
        self.method = mask_method
        self.mask_method = self.method.name
        # recompute block activations in the backward pass: less memory, about a third more compute
        self.grad_checkpointing = grad_checkpointing
        self.in_chans = in_chans
        self.encoder_in_chans = self.method.encoder_in_chans(in_chans)
        self.norm_pix_loss = norm_pix_loss

        # --------------------------------------------------------------------------
        # encoder
        self.preencoder = self.method.build_preencoder(patch_size, in_chans)
        self.patch_embed = PatchEmbed(img_size, patch_size, self.encoder_in_chans, embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # --------------------------------------------------------------------------
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.initialize_weights()
        if not self.method.drops_tokens:
            # Methods that keep every token never use it; the parameter stays (checkpoint keys) but
            # is frozen so DDP and the optimizer do not see an unused parameter.
            self.mask_token.requires_grad_(False)

    def initialize_weights(self) -> None:
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos).float().unsqueeze(0))

        # patch_embed like nn.Linear rather than nn.Conv2d
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def no_weight_decay_keys(self) -> set[str]:
        """Parameters kept out of weight decay beyond norms and biases: the pre-encoder, so that
        it stays at identity unless the loss asks otherwise."""
        return {n for n, _ in self.named_parameters() if n.startswith("preencoder.")}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), pixels in (row, col, channel) order within a patch."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        assert h % p == 0 and w % p == 0
        gh, gw = h // p, w // p
        x = imgs.reshape(n, c, gh, p, gw, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(n, gh * gw, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W) on this model's patch grid."""
        p = self.patch_size
        gh, gw = self.grid_size
        c = x.shape[-1] // (p * p)
        assert gh * gw == x.shape[1]
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def encoder_input(self, imgs: torch.Tensor, seg_mask: torch.Tensor | None) -> torch.Tensor:
        """The image-shaped tensor the patch embedding sees."""
        x = self.method.encoder_input(imgs, seg_mask)
        return self.preencoder(x) if self.preencoder is not None else x

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                        seg_mask: torch.Tensor | None = None):
        """Returns (latent, mask, ids_restore). For ``patches`` latent holds only the kept tokens
        and mask is 0/1; for segment methods every token is kept, ids_restore is None and mask is
        the per-patch hidden fraction."""
        x = self.patch_embed(self.encoder_input(imgs, seg_mask))
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.method.hide_tokens(x, mask_ratio, noise, seg_mask, self.patch_size, self.grid_size)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self._run_blocks(self.blocks, x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
        x = self.decoder_embed(x)

        if ids_restore is not None:
            # append mask tokens and put every token back in its original position
            n_mask = ids_restore.shape[1] + 1 - x.shape[1]
            mask_tokens = self.mask_token.to(x.dtype).expand(x.shape[0], n_mask, -1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)

        x = x + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # drop the cls token

    @property
    def seg_loss(self) -> str | None:
        """The segment methods' --seg_loss (None for a method without it)."""
        return getattr(self.method, "seg_loss", None)

    def loss_weights(self, mask: torch.Tensor, seg_mask: torch.Tensor | None) -> torch.Tensor:
        """(N, L, K): what forward_loss weighs each patch's squared errors with, as the mask method
        says (K = 1: a weight per patch, K = p*p: per pixel). Their sum is the loss's normaliser,
        by which N ranks also rescale their losses to compute the gradient of one process
        (engine_pretrain.normalise_by_global_weight)."""
        return self.method.loss_weights(mask, seg_mask, self.patch_size)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The whole loss: sum(w * e) / sum(w). imgs: (N, C, H, W); pred: (N, L, p*p*C); weights
        (N, L, K) (or (N, L), one per patch), each on the mean squared error of the K-th part of its
        patch against the target (per-patch normalised with --norm_pix_loss): with K = 1 the
        patch's mean error (the reference's loss on dropped patches), with K = p*p a pixel's mean
        over channels (the loss on hidden pixels only). Nothing weighed gives 0, not NaN."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        sq_error = (pred.float() - target) ** 2
        weights = (weights.unsqueeze(-1) if weights.dim() == 2 else weights).float()
        n, length, parts = weights.shape
        per_part = sq_error.reshape(n, length, parts, -1).mean(dim=-1)
        return (per_part * weights).sum() / weights.sum().clamp_min(1e-12)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                seg_mask: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, seg_mask)
        pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, self.loss_weights(mask, seg_mask))
        return loss, pred, mask


# ------------------------------------------------------------------------------------------------
# Registry. Every function takes keyword overrides (img_size, norm_pix_loss, mask_method, depth...).

def _mae(defaults: dict, kwargs: dict) -> MaskedAutoencoderViT:
    cfg = dict(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(defaults)
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


# encoder sizes are models_vit's; decoders: the reference's 512-d x 8 blocks, lighter for tiny/small
_DEC512 = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_TINY = dict(ARCHITECTURES["tiny"], decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)
_SMALL = dict(ARCHITECTURES["small"], decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)
_BASE = dict(ARCHITECTURES["base"], **_DEC512)
_LARGE = dict(ARCHITECTURES["large"], **_DEC512)
_HUGE = dict(ARCHITECTURES["huge"], **_DEC512)


def mae_vit_tiny_patch16_dec128d4b(**kwargs):
    return _mae(dict(_TINY, patch_size=16), kwargs)


def mae_vit_tiny_patch8_dec128d4b(**kwargs):
    return _mae(dict(_TINY, patch_size=8), kwargs)


def mae_vit_tiny_patch4_dec128d4b(**kwargs):
    return _mae(dict(_TINY, patch_size=4), kwargs)


def mae_vit_small_patch16_dec256d4b(**kwargs):
    return _mae(dict(_SMALL, patch_size=16), kwargs)


def mae_vit_small_patch8_dec256d4b(**kwargs):
    return _mae(dict(_SMALL, patch_size=8), kwargs)


def mae_vit_small_patch4_dec256d4b(**kwargs):
    return _mae(dict(_SMALL, patch_size=4), kwargs)


def mae_vit_small_patch4_dec512d8b(**kwargs):
    """Union14M's text-line MAE (mae/models_mae.py there): ViT-S/4 with the reference's decoder."""
    return _mae(dict(ARCHITECTURES["small"], **_DEC512, patch_size=4), kwargs)


def mae_vit_base_patch4_dec512d8b(**kwargs):
    """Union14M's default pretraining model: ViT-B/4, decoder 512 x 8 blocks, 16 heads."""
    return _mae(dict(_BASE, patch_size=4), kwargs)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _mae(dict(_BASE, patch_size=16), kwargs)


def mae_vit_base_patch8_dec512d8b(**kwargs):
    return _mae(dict(_BASE, patch_size=8), kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _mae(dict(_LARGE, patch_size=16), kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _mae(dict(_HUGE, patch_size=14), kwargs)


# recommended architectures (the reference's names)
mae_vit_tiny_patch16 = mae_vit_tiny_patch16_dec128d4b
mae_vit_tiny_patch8 = mae_vit_tiny_patch8_dec128d4b
mae_vit_tiny_patch4 = mae_vit_tiny_patch4_dec128d4b
mae_vit_small_patch16 = mae_vit_small_patch16_dec256d4b
mae_vit_small_patch8 = mae_vit_small_patch8_dec256d4b
mae_vit_small_patch4 = mae_vit_small_patch4_dec512d8b  # Union14M's (before: the _dec256d4b one)
mae_vit_base_patch4 = mae_vit_base_patch4_dec512d8b  # Union14M's default
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_base_patch8 = mae_vit_base_patch8_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks

MODEL_NAMES = sorted(n for n, f in list(globals().items()) if n.startswith("mae_vit_") and callable(f))


def own_model_name(name: str) -> tuple[str, str]:
    """(this repo's name, a note saying so) for MAE-pytorch's pretraining names
    (pretrain_mae_{small,base,large}_patch16_224: the same encoders); (name, '') for any other."""
    for size in ("small", "base", "large"):
        if name == f"pretrain_mae_{size}_patch16_224":
            ours = f"mae_vit_{size}_patch16"
            return ours, (f"--model {name} is MAE-pytorch's name: this repo's is {ours} (the same ViT encoder at 224; "
                          f"its decoder is the MAE reference's, {globals()[ours].__name__})")
    return name, ""


# Names whose model changed: a checkpoint that records the name and holds the old model's weights
# (told apart by the decoder's width) is the old model, under its explicit name.
RENAMED = {"mae_vit_small_patch4": ("mae_vit_small_patch4_dec256d4b", 256)}


def model_of_checkpoint(name: str, state_dict: dict) -> str:
    """The registered name that builds the model in this checkpoint's state dict."""
    if name in RENAMED:
        old_name, old_width = RENAMED[name]
        weight = state_dict.get("decoder_embed.weight")
        if weight is not None and weight.shape[0] == old_width:
            return old_name
    return name


TEXT_LINE_MODELS = ("mae_vit_small_patch4", "mae_vit_base_patch4", "mae_vit_small_patch4_dec512d8b",
                    "mae_vit_base_patch4_dec512d8b")  # Union14M's: text lines of 32 x 128


def default_input_size(name: str) -> list[int]:
    """--input_size when none is given: 32 x 128 for Union14M's text-line models, else 224."""
    return [32, 128] if name in TEXT_LINE_MODELS else [224]


def build_mae(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Builds a registered model by name, with a clear error for an unknown one."""
    return globals()[check_registered(name, MODEL_NAMES)](**kwargs)


def model_patch_size(name: str) -> int:
    """Patch size of a registered model, without building it: 'mae_vit_base_patch16' -> 16."""
    return int(check_registered(name, MODEL_NAMES).split("_patch")[1].split("_")[0])
