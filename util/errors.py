"""Errors a user can cause and fix. The command lines print their message (which names the
problem and the fix) without a traceback and exit with status 1."""


class UserError(RuntimeError):
    """Base class: wrong paths, missing or corrupt files, mismatched checkpoints, NaN losses."""
