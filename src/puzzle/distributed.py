"""torch.distributed set-up shared by the distributed stages. World size 1 is the same code path.

Launch with `torchrun --nproc-per-node N puzzle library ...`; torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...) is all we read. Multi-node is torchrun's rendezvous, nothing home-made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); else rank 0 of 1."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if want_cuda else "gloo"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(0, 1, 0, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def distributed(device: str | None = None) -> Iterator[DistInfo]:
    """init_distributed(), and tear the group down afterwards if this context created it."""
    created = launched_by_torchrun() and not dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
