"""The MAE reference's module name for the per-iteration learning rate, kept so that scripts
written against it still import; the schedule (linear warmup, then half-cycle cosine down to
min_lr) lives in util/misc.py with the rest of what a training step calls around the model."""
from util.misc import adjust_learning_rate, lr_at  # noqa: F401
