"""Checkpoints (save, load, newest, prune, resume with the optimizer state by parameter name) and
the per-epoch log (which run a command continues: util/run_identity.py). Every write goes through util/files.py's
``atomic_write``; a checkpoint is written only when its weights are finite, so the newest
checkpoint is always one a run can continue from."""
from __future__ import annotations

import argparse
import glob
import os
import re
import zipfile

import torch

from util.distributed import is_main_process
from util.checkpoint_origin import refuse_foreign
from util.errors import CheckpointError, UserError
# used here; atomic_write_json, file_digest and StorageError also still reachable from here
from util.files import (StorageError, atomic_torch_save, atomic_write_json, file_digest,  # noqa: F401
                        read_jsonl, write_jsonl)
from util.optim import param_groups_layer_decay

# Our checkpoints store ``args`` as a Namespace (the reference's format); allow it in
# torch.load(weights_only=True) so no checkpoint needs unpickling of arbitrary objects.
torch.serialization.add_safe_globals([argparse.Namespace])


def append_log(output_dir: str, stats: dict) -> None:
    """Adds this epoch's row to output_dir/log.txt (main process only). The file is rewritten
    atomically: rows of this epoch or later (left by a run resumed from an older checkpoint) and a
    torn last line are dropped, so the log has one row per epoch whatever crashed when."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, "log.txt")
    rows = [r for r in read_jsonl(path) if not (isinstance(r, dict) and r.get("epoch", -1) >= stats["epoch"])]
    write_jsonl(path, rows + [stats])


# ------------------------------------------------------------------------------------------------
# checkpoints

def first_nonfinite(state_dict: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None (one device sync)."""
    floats = [(k, v) for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).cpu()
    return None if bool(finite.all()) else floats[int((~finite).nonzero()[0])][0]


def save_checkpoint(obj: dict, path: str) -> None:
    """Writes a checkpoint dict atomically, refusing non-finite weights: a run never leaves behind a
    checkpoint it cannot continue from. Errors name the newest intact checkpoint in the folder."""
    bad = first_nonfinite(obj["model"])
    if bad is not None:
        previous = _newest_intact(path)
        raise CheckpointError(
            f"the weights are not finite (NaN/inf in '{bad}') at epoch {obj.get('epoch')}: {path} was not "
            f"written. " + (f"The last good checkpoint is {previous}. " if previous else "No earlier checkpoint. ")
            + "Lower the learning rate (--blr / --lr), raise --warmup_epochs, or set --clip_grad.")
    try:
        atomic_torch_save(obj, path)
    except StorageError as e:
        previous = _newest_intact(path)
        raise StorageError(f"{e}. Nothing was overwritten"
                           + (f"; the newest intact checkpoint is {previous}" if previous else "")
                           + ". Free space (or fix the path) and rerun the same command to resume.") from None


def _newest_intact(path: str) -> str | None:
    found = find_last_checkpoint(os.path.dirname(os.path.abspath(path)))
    return found or (path if os.path.exists(path) else None)


def checkpoint_args(args: argparse.Namespace, run) -> argparse.Namespace:
    """The flags as a checkpoint stores them: a copy of args with the values the reference's
    start-up wrote into its args (rank, world size, GPU, backend) taken from ``run``
    (util.runtime.Runtime), the resolved --amp and the run record."""
    saved = argparse.Namespace(**vars(args))
    saved.distributed, saved.rank, saved.world_size, saved.gpu = run.distributed, run.rank, run.world_size, run.local_rank
    if run.distributed:
        saved.dist_backend = run.dist_backend
    saved.device, saved.amp, saved.record = str(run.device), run.amp, run.record
    return saved


def save_model(args, epoch: int, model_without_ddp, optimizer, loss_scaler, name: str | None = None,
               run=None) -> str:
    """checkpoint-<epoch>.pth (or checkpoint-<name>.pth) with the reference's keys; only the main
    process writes. 'args' holds the flags with the run's Runtime values in them (run: a
    util.runtime.Runtime). With --keep_last K older epoch checkpoints are pruned."""
    path = os.path.join(args.output_dir, f"checkpoint-{epoch if name is None else name}.pth")
    if is_main_process():
        save_checkpoint({
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer_state_dict(optimizer, model_without_ddp),
            "epoch": epoch,
            "scaler": loss_scaler.state_dict(),
            "args": checkpoint_args(args, run) if run is not None else args,
        }, path)
        if getattr(args, "keep_last", 0) and (name is None or name.isdigit()):
            prune_checkpoints(args.output_dir, args.keep_last, just_written=path)
    return path


def checkpoint_epochs(output_dir: str) -> list[tuple[int, str]]:
    """(number in the name, path) of every checkpoint-<number>.pth, ascending."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_checkpoint(path: str) -> dict:
    """Loads a checkpoint file (ours, the reference's or an official one) onto the CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    checkpoint = _read_checkpoint(path)
    refuse_foreign(checkpoint, path)
    return checkpoint


def _read_checkpoint(path: str) -> dict:
    try:
        # mmap: tensors are paged in when used, so peeking at a checkpoint's args is cheap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        error = e
    if not zipfile.is_zipfile(path):  # torch's legacy format (before 1.6, or _use_new_zipfile_serialization=False)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            error = e
        else:
            print(f"{path} is in torch's legacy (non-zip) format: read without mmap")
            return checkpoint
    raise CheckpointError(f"cannot load checkpoint {path} (truncated or not a PyTorch checkpoint?): {error}")


def stored_epochs(output_dir: str) -> list[tuple[int, str]]:
    """(stored epoch, path) of every readable checkpoint-<number>.pth, oldest first (ties: by name).
    The stored epoch, not the name, says which is newest: resume and pruning both use this."""
    found = []
    for number, path in checkpoint_epochs(output_dir):
        try:
            found.append((int(load_checkpoint(path)["epoch"]), number, path))
        except (UserError, KeyError, TypeError, ValueError):
            print(f"WARNING: skipping unreadable checkpoint {path}")
    return [(epoch, path) for epoch, _, path in sorted(found)]


def find_last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in output_dir, judged by content: the readable
    checkpoint-*.pth with the highest stored epoch (a truncated or foreign file is skipped)."""
    found = stored_epochs(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str, keep_last: int, just_written: str | None = None) -> None:
    """Deletes all but the newest keep_last readable numbered checkpoints, newest by stored epoch
    (as resume judges it). Never deletes just_written, and never a file it cannot read (a stray or
    foreign file is not ours to delete)."""
    found = [path for _, path in stored_epochs(output_dir)]
    keep = set(found[-max(keep_last, 1):])
    if just_written:
        keep.add(os.path.abspath(just_written))
    for path in found:
        if path not in keep and os.path.abspath(path) not in keep:
            os.remove(path)


def same_model_family(a: str | None, b: str | None) -> bool:
    """A short model name and its explicit name (mae_vit_small_patch4 and
    mae_vit_small_patch4_dec256d4b): a checkpoint recorded under the short name resumes under the
    explicit one; the weights' shapes then decide (load_state_dict is strict)."""
    return bool(a and b) and (a == b or a.startswith(b + "_dec") or b.startswith(a + "_dec"))


def load_model(args, model_without_ddp, optimizer, loss_scaler) -> None:
    """--resume: restores model, optimizer, scaler and sets args.start_epoch."""
    if not args.resume:
        return
    checkpoint = load_checkpoint(args.resume)
    saved = checkpoint.get("args")
    for key in ("mask_method", "model"):
        ours, theirs = getattr(args, key, None), getattr(saved, key, None)
        if key == "model" and same_model_family(ours, theirs):
            continue
        if ours is not None and theirs is not None and ours != theirs:
            raise CheckpointError(f"--resume {args.resume} was trained with --{key} {theirs}, but this run has "
                                  f"--{key} {ours}: pass --{key} {theirs} to continue it, or start a new run")
    bad = first_nonfinite(checkpoint["model"]) if "model" in checkpoint else None
    if bad is not None:
        raise CheckpointError(f"--resume {args.resume} holds non-finite weights (NaN/inf in '{bad}'): resume "
                              f"from an earlier checkpoint (--resume PATH) or move this one away")
    try:
        model_without_ddp.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise CheckpointError(f"--resume {args.resume} does not fit this model ({mismatch_hint(str(e))}): "
                              f"{str(e).splitlines()[-1].strip()}") from None
    print(f"Resume checkpoint {args.resume}")
    if "optimizer" in checkpoint and "epoch" in checkpoint and not getattr(args, "eval", False):
        load_optimizer_state(optimizer, checkpoint["optimizer"], model_without_ddp)
        args.start_epoch = checkpoint["epoch"] + 1
        if hasattr(saved, "max_accuracy"):  # finetuning's best top-1 so far
            args.max_accuracy = saved.max_accuracy
        if "scaler" in checkpoint:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        print("With optim & sched!")


def mismatch_hint(error: str) -> str:
    """Which flag to look at for a load_state_dict size mismatch."""
    if "head." in error or "head.weight" in error:
        return "check --nb_classes / --n-cls"
    if "pos_embed" in error:
        return "check --input_size / --crop-size"
    if "patch_embed" in error:
        return "check --model (patch size) and the input channels"
    return "check --model"


# ------------------------------------------------------------------------------------------------
# optimizer state by parameter name: a checkpoint's moments go to the same parameters whatever the
# group order (ours store the names; the reference's order is reconstructed)

def optimizer_param_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str]]:
    """The parameter names of each of the optimizer's groups, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "") for p in group["params"]] for group in optimizer.param_groups]


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """optimizer.state_dict() with each group's parameter names ('param_names', as PyTorch writes for
    named parameters), so the state can be matched by name when the order changes."""
    state = optimizer.state_dict()
    for group, names in zip(state["param_groups"], optimizer_param_names(optimizer, model)):
        group.setdefault("param_names", names)
    return state


def _reference_group_names(model: torch.nn.Module) -> list[list[str]] | None:
    """The groups the original MAE code (timm 0.3.2) made for this model: there fc_norm is
    registered after head, so the layer-decay groups come in another order."""
    params = list(model.named_parameters())
    if not any(n.startswith("fc_norm.") for n, _ in params) or not hasattr(model, "blocks"):
        return None
    moved = [x for x in params if not x[0].startswith("fc_norm.")]
    at = max(i for i, (n, _) in enumerate(moved) if n.startswith("head")) + 1
    moved[at:at] = [x for x in params if x[0].startswith("fc_norm.")]

    class ReferenceOrder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = model.blocks

        def named_parameters(self, *a, **k):
            return iter(moved)

    names = {id(p): n for n, p in params}
    groups = param_groups_layer_decay(ReferenceOrder(), no_weight_decay=model.no_weight_decay()
                                      if hasattr(model, "no_weight_decay") else ())
    return [[names[id(p)] for p in g["params"]] for g in groups]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, model: torch.nn.Module) -> None:
    """Loads an optimizer state, matching parameters by name: names stored with the state, or, for
    a state written by the original MAE code, the names its parameter order implies."""
    ours = optimizer_param_names(optimizer, model)
    saved_groups = state["param_groups"]
    theirs = [g.get("param_names") for g in saved_groups]
    same_shape = [len(g["params"]) for g in saved_groups] == [len(n) for n in ours]
    if any(t is None for t in theirs):
        theirs = None if same_shape else _reference_group_names(model)
    if theirs is None or theirs == ours:
        try:
            optimizer.load_state_dict(state)
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({e}); resume "
                                  f"with the same model and flags, or start the optimizer afresh") from None
        return
    where = {name: idx for names, g in zip(theirs, saved_groups) for name, idx in zip(names, g["params"])}
    missing = [n for names in ours for n in names if n not in where]
    if missing:
        raise CheckpointError(f"the checkpoint's optimizer state has no entry for {missing[:3]}: it was made for "
                              f"another model")
    remapped, index = {}, 0
    groups = []
    for names, group in zip(ours, optimizer.state_dict()["param_groups"]):
        new_ids = []
        for name in names:
            if where[name] in state["state"]:
                remapped[index] = state["state"][where[name]]
            new_ids.append(index)
            index += 1
        groups.append({**group, "params": new_ids})
    optimizer.load_state_dict({"state": remapped, "param_groups": groups})
    print("optimizer state matched to the parameters by name")


# ------------------------------------------------------------------------------------------------
# one writer per output folder

