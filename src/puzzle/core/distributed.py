"""torch.distributed set-up shared by the distributed stages. World size 1 is the same code path.

Launch with `torchrun --nproc-per-node N puzzle library ...`; torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...) is all we read. Multi-node is torchrun's rendezvous, nothing home-made.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import weakref
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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU up front: without it every barrier() guesses
        # the device (and warns so), and a rank whose current device was never set would use GPU 0.
        dist.init_process_group(backend or ("nccl" if want_cuda else "gloo"), device_id=dev if want_cuda else None)
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


# Set when a gloo process group outlived destroy_process_group(); see finish_process().
_lingering_gloo = False


@contextlib.contextmanager
def distributed(device: str | None = None) -> Iterator[DistInfo]:
    """init_distributed(), and tear the group down afterwards if this context created it."""
    global _lingering_gloo
    created = launched_by_torchrun() and not dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
    finally:
        if created and dist.is_initialized():
            group = dist.group.WORLD
            gloo = dist.get_backend(group) == "gloo"
            alive = weakref.ref(group)
            del group
            dist.destroy_process_group()
            gc.collect()
            # FSDP2's DeviceMesh is held by torch's DTensor caches and holds the group, so a gloo group and its
            # worker threads can survive destroy_process_group(). Those threads drop their last tensor references
            # after a collective completes; one that does so while the interpreter finalizes aborts the process
            # ("terminate called without an active exception", exit -6). finish_process() avoids finalizing then.
            _lingering_gloo = _lingering_gloo or (gloo and alive() is not None)


def lingering_process_group() -> bool:
    """True when a gloo process group this process created is still alive after its teardown."""
    return _lingering_gloo


def finish_process(code: int) -> int:
    """The exit code to return; but end the process at once (flushed, no interpreter finalization) when a gloo
    process group outlived its teardown, because finalizing with its worker threads alive can abort (see above)."""
    if not _lingering_gloo:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reset_peak_memory(device: torch.device) -> None:
    """Start a stage's peak-memory record on this rank (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def rank_resources(info: DistInfo, wall_s: float, **extra: object) -> list[dict[str, object]]:
    """Collective: every rank's wall time and CUDA peak memory since `reset_peak_memory` (GiB; None off CUDA),
    in rank order, so rank 0 can record what each GPU of a multi-GPU stage used."""
    peak = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None
    mine = {"rank": info.rank, "device": str(info.device), "wall_s": round(wall_s, 3),
            "peak_memory_gib": None if peak is None else round(peak, 3), **extra}
    return [dict(r) for r in all_gather_objects(mine)]  # type: ignore[call-overload]
