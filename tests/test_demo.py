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


def demo_compare_commands() -> list[list[str]]:
    """The benchmark command lines `make demo-compare` runs, as make expands them (the loop over
    COMPARE_METHODS unrolled)."""
    out = subprocess.run(["make", "-n", "-s", "--always-make", "demo-compare", "VENV=.venv"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    commands = []
    for line in out.splitlines():
        loop = re.match(r"for m in (.*?); do (.*) \|\| exit 1; done$", line)
        for method in shlex.split(loop.group(1)) if loop else [None]:
            text = loop.group(2).replace("$m", method) if loop else line
            words = shlex.split(text)
            if len(words) > 1 and words[1] == "benchmark.py":
                commands.append(words[2:])
    return commands


def test_every_demo_compare_command_passes_the_benchmarks_checks(monkeypatch):
    """Each run of `make demo-compare` (the README's toy comparison) is a valid benchmark command:
    its flags parse and every stage's flags pass that stage's own checks, as before a real run."""
    import benchmark
    from mask_methods import MASK_METHODS
    commands = demo_compare_commands()
    runs = [c for c in commands if c[0] != "compare"]
    methods = {c[c.index("--mask-method") + 1] for c in runs}
    assert methods == set(MASK_METHODS) and len(runs) == len(MASK_METHODS) + 2, commands
    assert ["compare", "--output-dir", "output_compare"] in commands
    monkeypatch.chdir(REPO)
    choices = set()
    for argv in runs:
        parser = benchmark.get_args_parser()
        args = parser.parse_args(argv)
        benchmark.check_args(args, parser)
        assert args.probe_eval and args.knn_eval
        choices.add((args.mask_method, benchmark.check_stage_args(args).get("segment_choice")))
    assert {("segments", "random"), ("segment_tokens", "union")} <= choices
