"""Several processes under torchrun: joining the process group, and keeping the ranks in step.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them the run is one process and
nothing here touches torch.distributed. NCCL is used on CUDA, gloo on CPU.

Every collective has a timeout: a rank that fails or is killed makes the others fail within
TIMEOUT instead of waiting forever. The expected failures (a non-finite loss, Ctrl-C) are
agreed on at each step boundary (`any_rank`), so all ranks stop at the same step.
"""
from __future__ import annotations

import datetime
import os

import torch

# Longer than anything a rank legitimately waits for the others: rank 0 writing a checkpoint,
# or a slower rank still scanning its images before DistributedDataParallel's first broadcast.
TIMEOUT = datetime.timedelta(minutes=10)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(cuda: bool) -> tuple[int, torch.device]:
    """(rank, device) of this process, after joining the process group when world_size() > 1."""
    if world_size() == 1:
        return 0, torch.device("cuda" if cuda else "cpu")
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return rank, torch.device(f"cuda:{local}" if cuda else "cpu")


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all_reduce), so that every rank takes the same
    branch at a step boundary. One process: the flags as given."""
    if world_size() == 1:
        return list(flags)
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
