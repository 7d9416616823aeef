"""notebooks/visualize.ipynb, executed through a real Jupyter kernel (nbclient + ipykernel) on tiny
checkpoints of this repo and on an official-layout encoder file, on CPU."""
import os

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import models_vit
from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "visualize.ipynb")


def run_notebook(tmp_path, monkeypatch, **env) -> nbformat.NotebookNode:
    for key, value in {"SEGMAE_REPO": REPO, **env}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def outputs(nb, kind: str) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == kind]


def printed(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb, "stream"))


def figures(nb) -> list:
    return [o for o in outputs(nb, "display_data") if "image/png" in o.get("data", {})]


def test_notebook_shows_a_segment_methods_reconstruction(pretrained, toy_root, tmp_path, monkeypatch):
    nb = run_notebook(tmp_path, monkeypatch, SEGMAE_CHECKPOINT=pretrained["segments"], SEGMAE_DATA_PATH=toy_root)
    text = printed(nb)
    assert f"{pretrained['segments']}: segments, input 32x32, normalisation imagenet" in text
    assert "% of the image hidden" in text  # the SAM segment was read from masks/
    reconstruction, every_method = figures(nb)  # the checkpoint's method, then what each method hides
    assert len(reconstruction["data"]["image/png"]) > 1000
    assert len(every_method["data"]["image/png"]) > len(reconstruction["data"]["image/png"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["patches", "four_channels", "preencoder"])
def test_notebook_runs_for_every_method(pretrained, toy_root, tmp_path, monkeypatch, method):
    nb = run_notebook(tmp_path, monkeypatch, SEGMAE_CHECKPOINT=pretrained[method], SEGMAE_DATA_PATH=toy_root)
    assert f": {method}, input 32x32" in printed(nb) and len(figures(nb)) == 2


@pytest.mark.slow
def test_notebook_shows_an_official_encoder(toy_root, tmp_path, monkeypatch):
    """An official MAE file (encoder weights only, no args): --model names it, the decoder is random."""
    torch.manual_seed(0)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": models_vit.vit_tiny_patch16(num_classes=0).state_dict()}, path)
    nb = run_notebook(tmp_path, monkeypatch, SEGMAE_CHECKPOINT=str(path), SEGMAE_MODEL="mae_vit_tiny_patch16",
                      SEGMAE_DATA_PATH=toy_root)
    text = printed(nb)
    assert ": patches, input 224x224" in text and "random decoder" in text
    assert len(figures(nb)) == 2
