"""evals.probe: the frozen-encoder linear probe on ADE20k, alone and as the benchmark's --probe-eval."""
import json

import pytest
import torch

import evals.probe as probe


def probe_args(checkpoint, ade, out, *extra):
    return ["--checkpoint", checkpoint, "--dataset-dir", ade, "--crop-size", "32", "--epochs", "2",
            "--batch-size", "8", "--lr", "0.01", "--num-workers", "0", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("method", ["patches", "four_channels"])
def test_the_encoder_stays_bit_identical_and_only_the_head_trains(method, pretrained, toy_ade20k, tmp_path,
                                                                 monkeypatch):
    built = {}
    real = probe.frozen_segmenter

    def keep(args):
        model, name = real(args)
        built.update(model=model, encoder={k: v.clone() for k, v in model.encoder.state_dict().items()},
                     head={k: v.clone() for k, v in model.decoder.state_dict().items()})
        return model, name

    monkeypatch.setattr(probe, "frozen_segmenter", keep)
    result = probe.cli(probe_args(pretrained[method], toy_ade20k, tmp_path / "p.json", "--batchnorm"))
    model = built["model"]
    after = model.encoder.state_dict()
    assert after.keys() == built["encoder"].keys()
    for name, before in built["encoder"].items():  # weights and buffers, bit for bit
        assert torch.equal(after[name], before), name
    assert all(not p.requires_grad and p.grad is None for p in model.encoder.parameters())
    head = model.decoder.state_dict()
    changed = [k for k, v in built["head"].items() if not torch.equal(head[k], v)]
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias", "norm.running_mean"} <= set(changed)
    assert result["method"] == method and json.loads((tmp_path / "p.json").read_text()) == result
    assert 0 <= result["probe_miou"] <= 100 and result["train_images"] == 24


def test_errors_are_one_line(toy_ade20k, tmp_path, capsys):
    for checkpoint, expected in (("random", "--checkpoint random needs --backbone"),
                                 (str(tmp_path / "nothing.pth"), "checkpoint not found")):
        with pytest.raises(SystemExit) as e:
            probe.cli(probe_args(checkpoint, toy_ade20k, tmp_path / "out.json"))
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and not (tmp_path / "out.json").exists()


def test_the_probe_measures_the_features(pretrained, toy_ade20k, tmp_path):
    """The same probe on an encoder whose weights were zeroed (every patch gives the same feature)
    can only predict one class everywhere; on the pretrained encoder it scores far above that."""
    ckpt = torch.load(pretrained["patches"], map_location="cpu", weights_only=False)
    ckpt["model"] = {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}
    blank = tmp_path / "blank.pth"
    torch.save(ckpt, blank)
    scores = {name: probe.cli(probe_args(path, toy_ade20k, tmp_path / f"{name}.json", "--epochs", "4"))["probe_miou"]
              for name, path in (("pretrained", pretrained["patches"]), ("blank", str(blank)))}
    assert scores["blank"] < 15 and scores["pretrained"] > scores["blank"] + 10, scores
