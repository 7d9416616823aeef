"""The training step's speed options, in one place, each one switchable so that
tools/throughput.py can report what it gains: fused attention (SDPA), FP8 linear layers
(torchao), torch.compile with or without CUDA graphs, and the largest batch that fits.

What the step itself calls lives beside it in util/misc.py: bf16 autocast (autocast) and the
CUDA-graph step marker (mark_step_begin). The fused optimizer is util/optim.py's (adamw).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from util.errors import UserError

# torch.compile modes; the two with CUDA graphs need a step marker (util.misc.mark_step_begin)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switches timm's attention between F.scaled_dot_product_attention (fused: flash / memory-
    efficient kernels) and the explicit softmax(q k^T) v of the MAE reference. Returns how many
    attention modules were switched."""
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
            module.fused_attn = enabled
            n += 1
    return n


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """torch.compile; ``reduce-overhead`` also records the step as CUDA graphs (one launch per
    graph instead of one per kernel), which pays when kernels are short (small models / batches)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=None if mode == "default" else mode)


def resolve_compile_flags(args) -> None:
    """``--compile_mode`` other than default implies ``--compile``."""
    if getattr(args, "compile_mode", "default") != "default":
        args.compile = True


def fp8_layer_filter(module: nn.Module, name: str) -> bool:
    """Which Linear layers run in FP8: every transformer Linear whose sizes the FP8 matmul accepts
    (multiples of 16), except the pixel-regression head ``decoder_pred`` and classifier heads, whose
    outputs are the loss's inputs and keep full precision, as is usual for FP8 training."""
    if not isinstance(module, nn.Linear):
        return False
    if name.split(".")[-1] in ("decoder_pred", "head"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: nn.Module, device: torch.device) -> int:
    """Swaps the Linear layers chosen by fp8_layer_filter for torchao's Float8Linear (dynamic
    per-tensor scaling: e4m3 forward, e5m2 gradients), in place. Weights, their names and the
    checkpoint format stay those of nn.Linear. Returns the number of layers converted.

    FP8 matmuls run on GPUs of compute capability 8.9+ (Ada, Hopper); on the CPU torchao emulates
    them (slowly), which is how the tests check the numbers."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is "
                        f"{major}.{minor}. Train without --fp8 (bf16 is the default).")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("--fp8 needs torchao: pip install torchao") from None
    names = [name for name, m in model.named_modules() if fp8_layer_filter(m, name)]
    convert_to_float8_training(model, module_filter_fn=fp8_layer_filter)
    return len(names)


def find_max_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 1 << 14) -> int:
    """Largest batch size b <= limit with fits(b), assuming fits is monotone (if b fits, so does any
    smaller batch): doubles from ``start`` until a batch fails, then bisects. 0 when nothing fits."""
    lo, hi = 0, limit + 1  # lo fits (or is 0); hi does not (or is past the limit)
    b = max(1, min(start, limit))
    while True:
        if not fits(b):
            hi = b
            break
        lo = b
        if b >= limit:
            break
        b = min(2 * b, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
