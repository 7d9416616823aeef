"""Which codebase a checkpoint comes from, read off its contents: this repo's, the original segmae
code's (DeinAlptraum/mae: its args have mask_method and none of this repo's flags, its
preencoder checkpoints a CombinedModel), facebookresearch/mae's and the official files, or another
MAE codebase whose model is not this one (refused whole). Adapting one to a model is
util/checkpoint_adapt.py."""
from __future__ import annotations

from util.errors import AdaptationError

# recorded in the args of this repo's checkpoints: a mask channel holds v = 1 - m (the original's: m)
FOURTH_CHANNEL_KEY = "fourth_channel"

# flags that only this repo writes into a checkpoint's args (the original segmae code has none of them)
_OWN_ARGS = ("data_timeout", "in_chans", "amp", "data_backend", "fold_mask_channel")


def checkpoint_origin(checkpoint: dict) -> str:
    """'repo' (this code), 'segmae' (the original segmae code: its args have mask_method and none
    of this repo's flags) or 'reference' (facebookresearch/mae, official files: patches only)."""
    saved = checkpoint.get("args")
    if saved is None:
        return "reference"
    has = (lambda k: k in saved) if isinstance(saved, dict) else (lambda k: hasattr(saved, k))  # noqa: E731
    if any(has(k) for k in (FOURTH_CHANNEL_KEY,) + _OWN_ARGS):
        return "repo"
    return "segmae" if has("mask_method") else "reference"


def is_segmae_combined(sd: dict) -> bool:
    """The original segmae code's preencoder checkpoint: model.* (the MAE) + encoder.* (its conv)."""
    return "encoder.weight" in sd and any(k.startswith("model.") for k in sd)


def state_dict_of(checkpoint: dict) -> dict:
    """The weights in a checkpoint dict ('model', 'state_dict' or the dict itself)."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def mae_pytorch_kind(checkpoint: dict) -> str | None:
    """'pretraining' or 'finetuned' for a checkpoint of pengzhiliang/MAE-pytorch (BEiT's ViT: the
    encoder under ``encoder.`` beside ``encoder_to_decoder``, or a ViT with BEiT's ``q_bias`` and
    no class token), else None."""
    sd = checkpoint.get("module") if isinstance(checkpoint.get("module"), dict) else state_dict_of(checkpoint)
    if not isinstance(sd, dict):
        return None
    def beit_without_cls(prefix: str) -> bool:  # BEiT's attention biases, no class token
        return f"{prefix}cls_token" not in sd and any(k.startswith(f"{prefix}blocks.") and k.endswith(".attn.q_bias")
                                                       for k in sd)
    # (Segmenter's checkpoints also hold encoder.blocks.*, with a class token and timm's qkv bias)
    if "encoder_to_decoder.weight" in sd or beit_without_cls("encoder."):
        return "pretraining"
    if beit_without_cls(""):
        return "finetuned"
    return None


def refuse_foreign(checkpoint: dict, path: str) -> None:
    """A checkpoint of another MAE codebase whose model is not this repo's is refused whole: loading
    the tensors whose names happen to match would train a silently different model."""
    kind = mae_pytorch_kind(checkpoint) if isinstance(checkpoint, dict) else None
    if kind:
        raise AdaptationError(
            f"{path} is a MAE-pytorch (pengzhiliang/MAE-pytorch) {kind} checkpoint: its ViT has no class token "
            f"and a fixed 1-D sine-cosine position table that the file does not store, where this repo's ViT "
            f"(facebookresearch/mae's) has a class token and a 2-D table, so it cannot be loaded here, in whole "
            f"or in part. Start from an official MAE checkpoint (facebookresearch/mae) or one of this repo's")
