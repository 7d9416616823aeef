"""Which of this repository's modules one pretraining epoch runs code from: main_pretrain.py's
train_one_epoch + end_epoch (data -> model -> loss -> optimizer -> checkpoint) under a profiler,
one epoch of a tiny model on CPU with the loader in the main process (num_workers 0), so that the
data path is seen too. Prints the count and each module's functions that ran.

    python perf/step_modules.py --data_path data/toy --mask_method patches
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import main_pretrain  # noqa: E402
from mask_methods import MASK_METHODS  # noqa: E402
from run.flags import parse_flags  # noqa: E402


def repo_functions_called(fn, calls: dict[str, set[str]]):
    """``fn`` wrapped so that every call into a repo file (not the virtual environment) while it
    runs is recorded as {relative path: function names}."""
    prefix = REPO + os.sep

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(prefix) and f"{os.sep}.venv{os.sep}" not in path:
            calls[os.path.relpath(path, REPO)].add(frame.f_code.co_name)

    def wrapped(*args, **kwargs):
        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.setprofile(previous)
    return wrapped


def step_modules(data_path: str, mask_method: str, output_dir: str) -> dict[str, set[str]]:
    """{module: functions} for one epoch of ``mask_method`` on ``data_path``."""
    calls: dict[str, set[str]] = defaultdict(set)
    saved = main_pretrain.train_one_epoch, main_pretrain.end_epoch
    main_pretrain.train_one_epoch = repo_functions_called(saved[0], calls)
    main_pretrain.end_epoch = repo_functions_called(saved[1], calls)
    try:
        main_pretrain.cli(["--data_path", data_path, "--model", "mae_vit_tiny_patch16", "--input_size", "64",
                           "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--device", "cpu",
                           "--mask_method", mask_method, "--output_dir", output_dir, "--log_dir", output_dir])
    finally:
        main_pretrain.train_one_epoch, main_pretrain.end_epoch = saved
    return dict(calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=os.path.join(REPO, "data", "toy"))
    parser.add_argument("--mask_method", default="patches", choices=MASK_METHODS)
    args = parse_flags(parser, argv)
    with tempfile.TemporaryDirectory() as out:
        calls = step_modules(args.data_path, args.mask_method, out)
    print(f"a {args.mask_method} pretraining step touches {len(calls)} modules:")
    for path in sorted(calls):
        print(f"  {path}: {', '.join(sorted(calls[path]))}")


if __name__ == "__main__":
    main()
