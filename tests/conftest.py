import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FIXTURES = os.path.join(REPO, "..", "shared", "fixtures")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def reference_fixture():
    path = os.path.join(FIXTURES, "mae_reference_tiny.pt")
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"reference fixture missing: {path} (../shared must sit beside the repo)")
        pytest.skip(f"reference fixture not found at {path}")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy dataset (4 classes x 8 train images, 32x32), made once per session."""
    from tools.make_toy_data import make_toy_dataset
    root = tmp_path_factory.mktemp("toy")
    return make_toy_dataset(str(root), train_per_class=8, val_per_class=2, height=32, width=32, seed=1)
