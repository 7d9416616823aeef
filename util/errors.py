"""Errors a user can cause and fix. The command lines print their message (which names the
problem and the fix) without a traceback and exit with status 1."""


class UserError(RuntimeError):
    """Base class: wrong paths, missing or corrupt files, mismatched checkpoints, NaN losses."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, not finite or does not fit the run."""


class AdaptationError(UserError):
    """A checkpoint that does not fit the requested model or method."""


class MaskFileError(UserError):
    """A mask file that is missing, unreadable or not in the SAM format."""


def run_tool(main, argv=None):
    """Runs a tool's main(argv); a UserError prints its message (no traceback) and exits 1."""
    import sys
    try:
        return main(argv)
    except UserError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
