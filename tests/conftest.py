import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# outputs of the original facebookresearch/mae code (tests/fixtures/README.md says how they were made)
FIXTURES = os.path.join(REPO, "tests", "fixtures")

# two cores: two threads for one test process; one per worker when pytest-xdist runs several, and
# one in the CLIs they start (in-process and subprocess runs that must agree bit for bit use the
# same number of threads)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def reference_fixture():
    path = os.path.join(FIXTURES, "mae_reference_tiny.pt")
    if not os.path.exists(path):  # the tests that matter most: never skipped
        pytest.fail(f"reference fixture missing: {path} (it is part of the repository)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy dataset (4 classes x 8 train images, 32x32), made once per session."""
    from tools.make_toy_data import make_toy_dataset
    root = tmp_path_factory.mktemp("toy")
    return make_toy_dataset(str(root), train_per_class=8, val_per_class=2, height=32, width=32, seed=1)


METHODS = ["patches", "segments", "four_channels", "preencoder"]


@pytest.fixture(scope="session")
def toy_ade20k(tmp_path_factory):
    """A toy ADE20k: 24 training and 6 validation images (64x96 and 96x64)."""
    from tools.make_toy_data import make_toy_ade20k
    return make_toy_ade20k(str(tmp_path_factory.mktemp("ade")), n_train=24, n_val=6, seed=2)


@pytest.fixture(scope="session")
def pretrained(toy_root, tmp_path_factory):
    """One-epoch pretraining checkpoints of every method (tiny ViT, patch 8, 32x32)."""
    import main_pretrain
    out = {}
    for method in METHODS:
        d = tmp_path_factory.mktemp(f"pre_{method}")
        main_pretrain.cli(["--data_path", toy_root, "--model", "mae_vit_tiny_patch8", "--input_size", "32",
                           "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
                           "--output_dir", str(d), "--log_dir", str(d), "--device", "cpu",
                           "--mask_method", method, "--print_freq", "10"])
        out[method] = str(d / "checkpoint-0.pth")
    return out




@pytest.fixture
def count_stages(monkeypatch):
    """The benchmark stages (module names) that run, in order."""
    import benchmark
    calls = []
    real = benchmark.run_stage

    def counting(module, argv, args, inprocess):
        calls.append(module)
        return real(module, argv, args, inprocess)

    monkeypatch.setattr(benchmark, "run_stage", counting)
    return calls


@pytest.fixture(autouse=True)
def plain_print():
    """Entry points run in-process wrap print with a timestamp for the rest of the process (as the
    reference does): each test starts with the plain one, as a user's fresh command does."""
    import builtins
    plain = builtins.print
    yield
    builtins.print = plain
