"""`make demo` on its own settings: the Makefile's DEMO_ARGS, on freshly made toy data, give a
Segmenter mIoU that rises from chunk to chunk (what the demo exists to show)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def demo_args(toy: Path, toy_ade: Path, out: Path) -> list[str]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(r"^DEMO_ARGS :=(.*)$", text, re.M).group(1)
    line = line.replace("$(DEMO_PRETRAIN)", re.search(r"^DEMO_PRETRAIN :=(.*)$", text, re.M).group(1).strip())
    line = line.replace("$(TOY_ADE)", str(toy_ade)).replace("$(TOY)", str(toy))
    argv = shlex.split(line)
    argv[argv.index("--output-dir") + 1] = str(out)
    return argv


def test_demo_target_uses_demo_args():
    text = (REPO / "Makefile").read_text()
    assert "benchmark.py $(DEMO_ARGS)" in text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]


@pytest.mark.slow
def test_demo_scores_rise_over_chunks(tmp_path):
    toy, toy_ade, out = tmp_path / "toy", tmp_path / "toy_ade20k", tmp_path / "output_demo"
    make = re.search(r"\$\(PY\) tools/make_toy_data.py (.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    make = make.replace("$(TOY_ADE)", str(toy_ade)).replace("$(TOY)", str(toy))
    subprocess.run([sys.executable, str(REPO / "tools/make_toy_data.py"), *shlex.split(make)], check=True, cwd=REPO)
    subprocess.run([sys.executable, str(REPO / "benchmark.py"), *demo_args(toy, toy_ade, out)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["epochs"])
    assert [r["epochs"] for r in rows] == [6, 12, 18]
    miou = [r["mIoU"] for r in rows]
    assert all(a < b for a, b in zip(miou, miou[1:])), f"demo mIoU does not rise over the chunks: {miou}"
