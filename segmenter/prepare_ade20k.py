"""Download and unpack ADE20k (the official ADEChallengeData2016.zip, about 923 MB).

    python -m segmenter.prepare_ade20k --out data          # -> data/ADEChallengeData2016/
    python -m segmenter.prepare_ade20k --out data --zip /mnt/copy/ADEChallengeData2016.zip   # no network
    python -m segmenter.prepare_ade20k --out data --folder /mnt/copy/ADEChallengeData2016    # unpacked copy

Skips the download when a complete copy is already there, checks the archive's SHA-1 before
unpacking, and unpacks into a temporary folder that is renamed at the end, so an interrupted run
never leaves a half dataset that looks complete.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
import urllib.request
import zipfile

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run.files import file_digest  # noqa: E402
from run.flags import parse_flags  # noqa: E402

ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ADE20K_SHA1 = "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"
DATASET_DIR = "ADEChallengeData2016"
REQUIRED = ("images/training", "images/validation", "annotations/training", "annotations/validation")


def is_complete(root: str) -> bool:
    return all(os.path.isdir(os.path.join(root, d)) and os.listdir(os.path.join(root, d)) for d in REQUIRED)


def missing_parts(root: str) -> list[str]:
    return [d for d in REQUIRED if not (os.path.isdir(os.path.join(root, d)) and os.listdir(os.path.join(root, d)))]


def download(url: str, path: str) -> None:
    """Streams url to path (via path.part) with a progress line."""
    part = path + ".part"
    with urllib.request.urlopen(url) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        done, start, last = 0, time.time(), 0.0
        while True:
            block = response.read(1 << 20)
            if not block:
                break
            f.write(block)
            done += len(block)
            now = time.time()
            if now - last > 0.5 or (total and done == total):
                speed = done / max(now - start, 1e-6) / 2 ** 20
                pct = f"{100 * done / total:5.1f}% of {total / 2 ** 20:.0f} MB" if total else f"{done / 2 ** 20:.0f} MB"
                print(f"\rdownloading {os.path.basename(path)}: {pct}  {speed:.1f} MB/s", end="", file=sys.stderr)
                last = now
    print(file=sys.stderr)
    os.replace(part, path)


def link_folder(folder: str, out: str, root: str) -> str:
    """``root`` made a link to an unpacked, complete copy."""
    if not is_complete(folder):
        raise SystemExit(f"--folder {folder} is not a complete {DATASET_DIR} (needs {', '.join(REQUIRED)})")
    os.makedirs(out, exist_ok=True)
    if os.path.islink(root):  # an earlier link, to an incomplete or moved copy
        os.remove(root)
    elif os.path.exists(root):
        raise SystemExit(f"{root} exists but is incomplete (needs {', '.join(missing_parts(root))}): move or "
                         f"remove it (rm -r {shlex.quote(root)}), or pass another --out, then run again")
    os.symlink(os.path.abspath(folder), root)
    print(f"ADE20k ready in {root} (a link to {folder})")
    return root


def checked_archive(out: str, url: str, sha1: str | None, zip_path: str | None) -> str:
    """The archive's path, downloaded into ``out`` unless ``zip_path`` (the user's copy) is given,
    and its checksum checked: a bad download is moved aside, the user's copy is left alone."""
    if zip_path and not os.path.isfile(zip_path):
        raise SystemExit(f"--zip {zip_path} does not exist")
    archive = zip_path or os.path.join(out, os.path.basename(url) or "ADEChallengeData2016.zip")
    if not zip_path and (not os.path.exists(archive) or (sha1 and file_digest(archive, "sha1") != sha1)):
        try:
            download(url, archive)
        except OSError as e:  # URLError is an OSError: no network, DNS, refused
            raise SystemExit(f"cannot download {url} ({getattr(e, 'reason', e)}). Without network, copy "
                             f"ADEChallengeData2016.zip here and pass --zip PATH (or --folder for an unpacked "
                             f"copy)") from None
    if sha1:
        got = file_digest(archive, "sha1")
        if got != sha1:
            if zip_path:  # the user's copy: left where it is
                raise SystemExit(f"checksum mismatch for --zip {archive}: SHA-1 {got}, expected {sha1}. The file was "
                                 f"left as it is: copy the archive again (or pass --sha1 '' to skip the check)")
            os.replace(archive, archive + ".bad")
            raise SystemExit(f"checksum mismatch for {archive}: SHA-1 {got}, expected {sha1}. The file was moved "
                             f"to {archive}.bad; run again to download it anew.")
    return archive


def unpack(archive: str, out: str, root: str) -> None:
    """Unpacks into a temporary folder beside ``root``, then moves the complete dataset into place."""
    tmp = os.path.join(out, f".{DATASET_DIR}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    except (OSError, zipfile.BadZipFile) as e:  # e.g. a member that is both a file and a folder
        shutil.rmtree(tmp, ignore_errors=True)
        what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        raise SystemExit(f"cannot unpack {archive} ({what}): a damaged or foreign archive; get a good copy of "
                         f"{DATASET_DIR}.zip") from None
    unpacked = os.path.join(tmp, DATASET_DIR)
    if not is_complete(unpacked):
        raise SystemExit(f"{archive} does not contain {DATASET_DIR}/ with {', '.join(REQUIRED)}")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(unpacked, root)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare(out: str, url: str = ADE20K_URL, sha1: str | None = ADE20K_SHA1, keep_zip: bool = False,
            zip_path: str | None = None, folder: str | None = None) -> str:
    """Returns the path of the ADEChallengeData2016 folder, downloading and unpacking if needed.
    zip_path: a local copy of the archive (no network; never deleted); folder: an already unpacked copy."""
    root = os.path.join(out, DATASET_DIR)
    if is_complete(root):
        print(f"{root} is already complete; nothing to do")
        return root
    if folder:
        return link_folder(folder, out, root)
    os.makedirs(out, exist_ok=True)
    archive = checked_archive(out, url, sha1, zip_path)
    unpack(archive, out, root)
    if not (keep_zip or zip_path):
        os.remove(archive)
    print(f"ADE20k ready in {root}")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data", help="folder that will hold ADEChallengeData2016/")
    p.add_argument("--url", default=ADE20K_URL)
    p.add_argument("--sha1", default=ADE20K_SHA1, help="expected SHA-1 of the archive ('' to skip the check)")
    p.add_argument("--keep-zip", action="store_true")
    p.add_argument("--zip", default=None, metavar="PATH", help="unpack this local copy of the archive (no download)")
    p.add_argument("--folder", default=None, metavar="PATH",
                   help="use this already unpacked ADEChallengeData2016 folder (linked from --out)")
    args = parse_flags(p, argv)
    prepare(args.out, args.url, args.sha1 or None, args.keep_zip, zip_path=args.zip, folder=args.folder)


if __name__ == "__main__":
    main()
