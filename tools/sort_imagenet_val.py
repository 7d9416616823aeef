r"""Sorts the official ImageNet validation images (50,000 JPEGs directly in val/) into class folders,
val/<wnid>/<image>, the layout finetuning, linear probing and kNN read. The labels come from one of

    LOC_val_solution.csv                      Kaggle's: ImageId,PredictionString (first word: the wnid)
    a two-column text file                    <image> <wnid> per line (e.g. a val.txt of that form)
    ILSVRC2012_validation_ground_truth.txt    the devkit's: one class ID (1..1000) per line, line i for
                                              ILSVRC2012_val_<i, 8 digits>.JPEG, with --meta meta.mat
                                              (the devkit's, needs scipy) or --synsets (wnids in ID order)

    python tools/sort_imagenet_val.py --val_dir /datasets/imagenet/val --labels LOC_val_solution.csv

Images are moved within val/ (--copy copies them instead). Every class name must be one plain folder
name (letters, digits, '_', '-', '.', '+'; not starting with '.'): a label file naming anything else
(../x, an absolute path) is refused whole. Every move is planned and checked before the first one
(a class folder that would be a file, an image already there), so a refusal moves nothing. Running
it again after an interruption finishes the job: images already in their class folder are left there.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs.folders import is_image  # noqa: E402
from run.flags import parse_flags  # noqa: E402
from run.setup import run_tool  # noqa: E402
from util.misc import UserError  # noqa: E402

# a class folder name: one path component, and one that every scan reads (a leading dot is hidden)
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name.strip()))[0]


def check_class_names(labels: dict[str, str], source: str) -> None:
    """Refuses the whole label file when one class name is not a plain folder name: joined to
    --val_dir, '../x' or '/x' would move images out of val/."""
    for key, name in labels.items():
        if not (CLASS_NAME.fullmatch(name) and len(name.encode()) <= 255):
            raise UserError(f"{source}: the class name {name!r} (of {key}) is not a plain folder name (letters, "
                            f"digits, '_', '-', '.', '+', not starting with '.'), so nothing was moved. Is it the "
                            f"validation set's label file? Fix the class names in it")


def read_synsets(meta: str | None, synsets: str | None) -> list[str]:
    """wnids in ILSVRC2012_ID order (ID 1 first)."""
    if synsets:
        with open(synsets) as f:
            wnids = [line.split()[0] for line in f if line.strip()]
        check_class_names({f"class ID {i}": w for i, w in enumerate(wnids, 1)}, f"--synsets {synsets}")
        return wnids
    if not meta:
        raise UserError("the devkit's ground truth gives class IDs: pass --meta <devkit>/data/meta.mat "
                        "(or --synsets, a file of wnids in ID order)")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading meta.mat needs scipy: pip install scipy (or pass --synsets)") from None
    rows = loadmat(meta, squeeze_me=True)["synsets"]
    by_id = {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows}
    check_class_names({f"class ID {i}": w for i, w in by_id.items()}, f"--meta {meta}")
    return [by_id[i] for i in range(1, 1001)]


def read_labels(path: str, meta: str | None = None, synsets: str | None = None) -> dict[str, str]:
    """image stem -> wnid, from any of the label files above; every wnid a plain folder name."""
    labels = _read_labels(path, meta, synsets)
    check_class_names(labels, f"--labels {path}")
    return labels


def _read_labels(path: str, meta: str | None, synsets: str | None) -> dict[str, str]:
    if not os.path.isfile(path):
        raise UserError(f"--labels {path} does not exist")
    with open(path, newline="") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--labels {path} is empty")
    if lines[0].startswith("ImageId"):  # Kaggle's CSV
        return {_stem(row[0]): row[1].split()[0] for row in csv.reader(lines[1:]) if len(row) >= 2 and row[1]}
    first = lines[0].split()
    if len(first) == 1 and first[0].isdigit():  # the devkit's class IDs
        wnids = read_synsets(meta, synsets)
        labels = {}
        for i, line in enumerate(lines, start=1):
            class_id = int(line)
            if not 1 <= class_id <= len(wnids):
                raise UserError(f"{path} line {i}: class ID {class_id} is not in 1..{len(wnids)}")
            labels[f"ILSVRC2012_val_{i:08d}"] = wnids[class_id - 1]
        return labels
    if len(first) >= 2:
        return {_stem(line.split()[0]): line.split()[1] for line in lines}
    raise UserError(f"--labels {path}: not a format this tool reads (see --help)")


def plan_moves(val_dir: str, labels: dict[str, str], copy: bool = False) -> tuple[list[tuple[str, str]], int]:
    """([(image, its place in its class folder)] for every flat image still to sort, how many are
    there already (--copy run again)). Every move is checked here, before the first is made: a
    class folder that would be a file of val/ (a wnid equal to an image's name) or an image of
    that name already in its class folder is an error naming the first and the count."""
    if not os.path.isdir(val_dir):
        raise UserError(f"--val_dir {val_dir} does not exist")
    check_class_names(labels, "the labels")
    flat = sorted(e.name for e in os.scandir(val_dir) if e.is_file() and is_image(e.name))
    unlabelled = [n for n in flat if _stem(n) not in labels]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} images in {val_dir} are not in the labels file, e.g. {unlabelled[0]}: "
                        f"is it the validation set's label file?")
    moves, done, blocked = [], 0, []
    for name in flat:
        folder = os.path.join(val_dir, labels[_stem(name)])
        source, target = os.path.join(val_dir, name), os.path.join(folder, name)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            blocked.append(f"the class folder {folder} of {name} would be a file that is already there")
        elif os.path.lexists(target):
            if copy and _same_file_contents(source, target):
                done += 1
                continue
            blocked.append(f"{target} already exists (another file of the same name as {source})")
        else:
            moves.append((source, target))
    if blocked:
        raise UserError(f"{len(blocked)} of {len(flat)} images cannot be sorted, e.g. {blocked[0]}; nothing was "
                        f"moved. Move those files away (or fix the labels), then run again")
    return moves, done


def _same_file_contents(a: str, b: str) -> bool:
    """A copy this tool made (same size and modification time: copy2 keeps it)."""
    sa, sb = os.stat(a), os.stat(b)
    return sa.st_size == sb.st_size and abs(sa.st_mtime - sb.st_mtime) < 1


def sort_val(val_dir: str, labels: dict[str, str], copy: bool = False, dry_run: bool = False) -> dict[str, int]:
    """Moves (or copies) each flat image of val_dir into val_dir/<wnid>/, every move planned and
    checked first. Returns counts."""
    moves, done = plan_moves(val_dir, labels, copy)
    if not dry_run:
        for source, target in moves:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if copy:  # through a temporary name: an interrupted copy never looks finished
                partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.part")
                shutil.copy2(source, partial)
                os.replace(partial, target)
            else:
                os.replace(source, target)
    classes = {os.path.basename(os.path.dirname(target)) for _, target in moves}
    return {"sorted": len(moves), "classes": len(classes), "already": done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val_dir", required=True, help="the flat folder of validation images")
    p.add_argument("--labels", required=True, help="LOC_val_solution.csv, <image> <wnid> lines, or the devkit's "
                                                   "ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--meta", help="the devkit's data/meta.mat (for its ground truth file)")
    p.add_argument("--synsets", help="instead of --meta: wnids in ILSVRC2012_ID order, one per line")
    p.add_argument("--copy", action="store_true", help="copy instead of moving")
    p.add_argument("--dry_run", action="store_true", help="check the labels, move nothing")
    args = parse_flags(p, argv)
    labels = read_labels(args.labels, args.meta, args.synsets)
    counts = sort_val(args.val_dir, labels, args.copy, args.dry_run)
    verb = "would sort" if args.dry_run else ("copied" if args.copy else "moved")
    print(f"{verb} {counts['sorted']} images of {args.val_dir} into {counts['classes']} class folders"
          + (f" ({counts['already']} copied by an earlier run)" if counts["already"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
