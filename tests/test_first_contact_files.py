"""First contact with files, exports and pictures: the tools say what they do with what a user
brings (docs/RELIABILITY.md, "First contact: files, exports and pictures")."""
import os
import shutil

from tools import convert_masks

WEIRD = "data $(touch pwned) it's"


# ---- convert_masks.py: nothing to convert, and commands that run as printed ---------------------------------

def test_convert_masks_on_sam_json_says_nothing_to_convert(toy_root, tmp_path, capsys):
    root = tmp_path / WEIRD
    shutil.copytree(toy_root, root)
    before = sorted(os.listdir(root))
    summary = convert_masks.main(["--data_path", str(root), "--workers", "1"])
    out = capsys.readouterr().out
    assert summary["format"] == "json" and summary["converted"] == 0
    assert "already SAM's JSON layout" in out and "nothing to convert" in out
    assert "mv " not in out and "To train on them" not in out
    assert sorted(os.listdir(root)) == before  # no masks_json written beside masks/
    # --out given: still nothing to write
    convert_masks.main(["--data_path", str(root), "--out", str(tmp_path / "elsewhere")])
    assert "nothing to convert" in capsys.readouterr().out and not (tmp_path / "elsewhere").exists()
