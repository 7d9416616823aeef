"""Repository hygiene that users rely on."""
import os
import re

from conftest import REPO


def _requirements():
    reqs = {}
    for line in open(os.path.join(REPO, "requirements.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", line).groups()
            reqs[name.lower()] = spec.strip()
    return reqs


def test_pipfile_lists_the_same_packages_as_requirements():
    text = open(os.path.join(REPO, "Pipfile")).read()
    section = text.split("[packages]")[1].split("[")[0]
    pip = {}
    for line in section.strip().splitlines():
        name, spec = line.split("=", 1)
        pip[name.strip().lower()] = spec.strip().strip('"')
    assert pip == _requirements()


def test_readme_names_the_two_commands_and_ci_runs_make_test():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in open(os.path.join(REPO, ".ci", "run")).read()


def test_a_pretraining_step_runs_code_from_few_modules(toy_root, tmp_path):
    """perf/step_modules.py's count for one epoch (data -> model -> loss -> optimizer ->
    checkpoint): a reader following a step opens these files and no more."""
    from perf.step_modules import step_modules
    patches = step_modules(toy_root, "patches", str(tmp_path / "patches"))
    segments = step_modules(toy_root, "segments", str(tmp_path / "segments"))
    seen = {"main_pretrain.py", "engine_pretrain.py", "models_mae.py", "mask_methods.py", "inputs/pretrain.py",
            "inputs/images.py", "run/checkpoint.py", "util/misc.py", "run/tracking.py"}
    assert seen <= set(patches), sorted(patches)  # the profiler saw every part of the step
    # the ten of a step plus its tracking (TensorBoard behind a writer that survives a failing disk)
    assert len(patches) <= 11, sorted(patches)
    # a segment method adds reading its mask: the SAM JSON format, the layout reader and its
    # interface, the mask-size policy
    assert set(patches) < set(segments) and len(segments) <= 15, sorted(segments)
    assert "sam/layouts.py" in segments
