"""What a run derives at start-up, kept apart from the flags it was given.

The parsed flags (``args``) stay as parsed; the process's place in the job, the device, the
mixed precision --amp resolved to, the compile mode in force and the run record (code,
versions, GPUs) are one ``Runtime``, made once by util.runsetup.setup_run and passed to what needs
them. A checkpoint still stores ``args`` as one Namespace with these values in it, the layout the
reference's checkpoints have (util.checkpoint.checkpoint_args).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: str = "none"  # "bf16", "fp16" or "none": --amp resolved for the device (bf16 where supported)
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU index on this node
    dist_backend: str = ""  # "nccl" or "gloo" when distributed
    compile_mode: str | None = None  # the torch.compile mode, None when not compiled
    record: dict = field(default_factory=dict)  # util.runsetup.run_record
