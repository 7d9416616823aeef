"""Input recipes shared by pretraining, finetuning, the Segmenter and the tools: the input
normalisations, the pretraining augment names, the data backends and input sizes as (H, W).

The pretraining augmentation itself (one crop and flip for an image and its mask) is in
inputs/pretrain.py, beside the dataset that applies it, as in the MAE reference; its GPU half (the
batch decoded and cropped on the training device) is in inputs/gpu_decode.py."""
from __future__ import annotations

import argparse

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# Input normalisation (mean, std): ImageNet's (MAE's, the default), or "vit": 0.5 / 0.5, what
# Union14M's text-line MAE and Segmenter's own ViT backbones use
NORMALIZATIONS = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                  "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# crop_flip: the reference's RandomResizedCrop + flip; resize: the whole image resized to the input
# size, nothing random (text lines: a crop cuts letters off, a flipped word is another word)
AUGMENTS = ("crop_flip", "resize")
REFERENCE_RECIPE = {"augment": "crop_flip", "normalization": "imagenet"}  # the MAE reference's (and older runs')
TEXT_LINE_RECIPE = {"augment": "resize", "normalization": "vit"}  # Union14M's, the default of its models
# cpu: loader workers decode, crop and resize; gpu: workers read the file, the device decodes and crops
DATA_BACKENDS = ("cpu", "gpu")


def as_hw(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """224 -> (224, 224); [32, 128] -> (32, 128)."""
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"input size must be one or two integers (H W), got {size}")
    return size


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """--augment and --normalization, recorded in every checkpoint."""
    parser.add_argument('--augment', default=None, choices=AUGMENTS,
                        help='crop_flip: random resized crop + flip (the reference); resize: the whole image resized '
                             'to --input_size, no crop, no flip (text lines). Default: resize for Union14M\'s text-line '
                             'models, else crop_flip; downstream: the --finetune checkpoint\'s')
    parser.add_argument('--normalization', default=None, choices=sorted(NORMALIZATIONS),
                        help='input mean/std: imagenet, or vit (mean = std = 0.5, Union14M\'s). Default: vit for '
                             'Union14M\'s text-line models, else imagenet; downstream: the --finetune checkpoint\'s')
