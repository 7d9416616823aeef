# The Segmenter's training and inference recipe, part of every benchmark evaluation's identity: a
# change that moves mIoU (the optimizer, the window merging, ...) bumps it, so that scores of two
# recipes are never one curve. "rstrudel-1": rstrudel/segmenter's, throughout.
RECIPE = "rstrudel-1"
