"""The parsed flags stay as parsed: what a run derives at start-up (device, ranks, the --amp it
resolved to, the compile mode, the run record) is its Runtime, and a checkpoint stores both in
its args, in the layout the reference's checkpoints have."""
import argparse

import torch
from test_pretrain_cli import common

import engine_pretrain
import main_pretrain
from run.checkpoint import checkpoint_args
from run.setup import Runtime

DERIVED = ("rank", "gpu", "distributed", "dist_backend", "record")  # (--world_size is a flag, as in the reference)


def test_the_flags_stay_parsed_and_the_checkpoint_holds_the_runtime(toy_root, tmp_path, monkeypatch):
    seen = {}
    real = engine_pretrain.train_one_epoch

    def spy(model, loader, optimizer, run, *a, args=None, **k):
        seen.update(run=run, args=argparse.Namespace(**vars(args)))
        return real(model, loader, optimizer, run, *a, args=args, **k)

    monkeypatch.setattr(main_pretrain, "train_one_epoch", spy)
    out = tmp_path / "o"
    main_pretrain.cli(common(toy_root, out))
    run, args = seen["run"], seen["args"]
    assert isinstance(run, Runtime) and run.device == torch.device("cpu") and run.amp == "none"
    assert (run.distributed, run.rank, run.world_size, run.local_rank, run.compile_mode) == (False, 0, 1, 0, None)
    assert run.record["world_size"] == 1 and run.record["torch"] == torch.__version__
    assert args.amp is None and args.device == "cpu"  # as parsed: --amp not given
    assert not [k for k in DERIVED if hasattr(args, k)]
    saved = torch.load(out / "checkpoint-0.pth", weights_only=True)["args"]
    assert isinstance(saved, argparse.Namespace)
    assert (saved.rank, saved.world_size, saved.gpu, saved.distributed) == (0, 1, 0, False)
    assert saved.amp == "none" and saved.device == "cpu" and saved.record == run.record
    assert saved.mask_method == args.mask_method and saved.blr == args.blr  # the flags are all there


def test_checkpoint_args_copies_and_leaves_the_flags_alone():
    args = argparse.Namespace(amp=None, device="cuda", model="mae_vit_base_patch16")
    run = Runtime(device=torch.device("cuda", 3), amp="bf16", distributed=True, rank=11, world_size=16,
                  local_rank=3, dist_backend="nccl", compile_mode="default", record={"host": "n1"})
    saved = checkpoint_args(args, run)
    assert (saved.rank, saved.world_size, saved.gpu, saved.dist_backend) == (11, 16, 3, "nccl")
    assert saved.device == "cuda:3" and saved.amp == "bf16" and saved.record == {"host": "n1"}
    assert vars(args) == {"amp": None, "device": "cuda", "model": "mae_vit_base_patch16"}


def test_a_compile_mode_is_in_the_runtime(toy_root, tmp_path, monkeypatch):
    """--compile_mode implies --compile (a flag's meaning, applied at parsing); the mode in force is
    the Runtime's (None when not compiled)."""
    import run.setup as runsetup
    made = []
    real = runsetup.setup_run
    monkeypatch.setattr(runsetup, "setup_run", lambda *a: made.append(real(*a)) or made[-1])
    monkeypatch.setattr(runsetup, "compile_model", lambda model, mode: model)  # no compiler on the CPU runner
    main_pretrain.cli(common(toy_root, tmp_path / "o", "--compile_mode", "max-autotune-no-cudagraphs"))
    assert made[0].compile_mode == "max-autotune-no-cudagraphs"
