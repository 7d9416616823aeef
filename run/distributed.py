"""Ranks and the process group: torchrun, SLURM or OpenMPI variables; NCCL on GPUs, gloo on CPU."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from util.misc import UserError, get_world_size, is_dist_avail_and_initialized, setup_for_distributed

DEFAULT_DIST_TIMEOUT_S = 600
RENDEZVOUS_GRACE_S = 5  # the store's own timeout error comes about a second after --dist_timeout


def init_distributed_mode(args: argparse.Namespace) -> dict:
    """Reads torchrun (RANK/WORLD_SIZE/LOCAL_RANK), OpenMPI (--dist_on_itp) or SLURM variables and
    returns this process's place: distributed, rank, world_size, local_rank, dist_backend. One
    process without any of them runs undistributed. NCCL on GPUs, gloo on CPU. Collectives time out
    after --dist_timeout seconds, so a stuck rank stops the job instead of hanging it."""
    global _LOCAL_RANK
    env = os.environ
    url = args.dist_url
    if args.dist_on_itp:
        rank, world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        if url == "env://":
            # the first node of the allocation hosts the rendezvous
            os.environ.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")))
            os.environ.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        print("Not using distributed mode")
        setup_for_distributed(is_master=True)
        _LOCAL_RANK = 0
        return {"distributed": False, "rank": 0, "world_size": 1, "local_rank": 0, "dist_backend": ""}

    _LOCAL_RANK = local_rank
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=getattr(args, "dist_timeout", DEFAULT_DIST_TIMEOUT_S))
    print(f"| distributed init (rank {rank}/{world_size}, {backend}): {url}, collective timeout {timeout}",
          flush=True)
    rendezvous(backend, url, world_size, rank, timeout, local_rank if use_cuda else None)
    dist.barrier()
    setup_for_distributed(rank == 0)
    return {"distributed": True, "rank": rank, "world_size": world_size, "local_rank": local_rank,
            "dist_backend": backend}


_LOCAL_RANK = 0  # this process's index on its node, set by init_distributed_mode


def rendezvous(backend: str, url: str, world_size: int, rank: int, timeout: datetime.timedelta,
               cuda_device: int | None = None) -> None:
    """init_process_group, bounded by --dist_timeout. Its store client can wait without end where
    MASTER_PORT belongs to another program that accepts the connection and never answers, so it
    runs in a thread that is given up after the timeout; its failures (the port in use, ranks that
    never came) become one line naming the address and the fix."""
    outcome: dict = {}

    def join() -> None:
        try:
            if cuda_device is not None:  # the current GPU is per thread
                torch.cuda.set_device(cuda_device)
            dist.init_process_group(backend=backend, init_method=url, world_size=world_size, rank=rank,
                                    timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=join, name="rendezvous", daemon=True)
    thread.start()
    seconds = int(timeout.total_seconds())
    thread.join(timeout.total_seconds() + RENDEZVOUS_GRACE_S)
    where = rendezvous_address(url)
    if thread.is_alive():
        raise UserError(f"the rendezvous of {world_size} ranks at {where} did not complete within --dist_timeout "
                        f"{seconds} s: another program may own that port (pick a free MASTER_PORT), or a rank never "
                        f"started (start every rank, or raise --dist_timeout)")
    error = outcome.get("error")
    if error is None:
        return
    if not isinstance(error, (RuntimeError, OSError, TimeoutError)):
        raise error
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        raise UserError(f"cannot host the rendezvous at {where}: the port is in use by another program; pick a free "
                        f"MASTER_PORT (or --dist_url) and start every rank again") from None
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        raise UserError(f"only {joined.group(1)} of {joined.group(2)} ranks joined the rendezvous at {where} within "
                        f"--dist_timeout {seconds} s: start every rank (the same command on each, or torchrun "
                        f"--nproc_per_node), or raise --dist_timeout") from None
    raise UserError(f"the rendezvous of {world_size} ranks at {where} failed ({text[:300]}): check MASTER_ADDR / "
                    f"MASTER_PORT (or --dist_url) and that every rank started") from None


def rendezvous_address(url: str) -> str:
    """host:port (or the file) where the ranks meet."""
    if url == "env://":
        return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} (MASTER_ADDR:MASTER_PORT)"
    return url


def first_rank_on_node() -> bool:
    """True in an undistributed process and on each node's first rank (the one local_main_first
    runs first)."""
    return not is_dist_avail_and_initialized() or _LOCAL_RANK == 0


@contextmanager
def local_main_first() -> Iterator[None]:
    """The block runs on each node's first rank, then on the others: the first ones do what the
    others can then do faster (count a tar shard's samples and save the counts, check the mask
    cache against masks/, walk the data tree, which the others then find in the page cache)."""
    if not is_dist_avail_and_initialized():
        yield
        return
    first = first_rank_on_node()
    if not first:
        dist.barrier()
    yield
    if first:
        dist.barrier()


def first_slurm_host(nodelist: str) -> str:
    """'gpu[003-005,010],cpu1' -> 'gpu003' (SLURM's compressed host list, first entry)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


# flags that rightly differ between ranks (or name the same thing by another mount point; the data
# itself is compared by its file list); torch.distributed.launch gives each rank its own --local_rank
PER_RANK_FLAGS = {"dist_url", "local_rank", "given_flags", "from_checkpoint", "data_path", "output_dir", "log_dir", "job_dir",
                  "resume", "finetune", "stack", "mae_chp", "dataset_dir"}


def file_list_digest(paths, root: str) -> str:
    """SHA-1 of a data set's file list relative to its root (the same data on another mount point
    gives the same digest)."""
    cut = len(root.rstrip(os.sep)) + 1 if root else 0
    listing = "\n".join(p[cut:] for p in paths)  # one hash call: ~1 s for 1.28M paths
    return hashlib.sha1(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def check_ranks_agree(args: argparse.Namespace, data: dict) -> None:
    """All-gathers what defines the run on each rank (its flags, and ``data``: e.g. each data set's
    length and file-list digest) and stops every rank with one message naming what differs and each
    rank's value, instead of training on inconsistent data or hanging at the first barrier."""
    if get_world_size() == 1:
        return
    mine = {f"--{k}": v for k, v in sorted(vars(args).items())
            if k not in PER_RANK_FLAGS and isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    mine.update(data)
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, mine)
    differ = sorted({k for values in gathered for k in values if any(v.get(k) != values.get(k) for v in gathered)})
    if differ:
        shown = "; ".join(f"{k}: " + ", ".join(f"rank {r} {v.get(k)!r}" for r, v in enumerate(gathered))
                          for k in differ[:4])
        raise UserError(f"the ranks disagree on {len(differ)} setting(s) that must be the same on all: {shown}. "
                        f"Start every rank with the same command and the same data")
