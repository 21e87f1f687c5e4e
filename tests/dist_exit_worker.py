"""Run by test_distributed_exit under torchrun: a few gloo collectives (with FSDP2 or without), then exit.

usage: dist_exit_worker.py fsdp|plain

FSDP2 leaves the gloo process group and its worker threads alive after teardown (torch's DTensor caches hold
its mesh). A worker thread that drops its last tensor reference while the interpreter finalizes aborts the
process, so puzzle.core.distributed.finish_process must skip finalization then (and only then). An atexit handler
shows whether the interpreter finalized.
"""

from __future__ import annotations

import atexit
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from puzzle.core.distributed import distributed, finish_process, lingering_process_group

torch.set_num_threads(1)
atexit.register(lambda: print("finalized", flush=True))
with distributed("cpu") as info:
    if sys.argv[1] == "fsdp":
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        fully_shard(model[0])
        fully_shard(model)
        model(torch.ones(2, 4)).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for _ in range(3):
        sums = torch.ones(6)
        dist.all_reduce(sums)
        assert sums.tolist() == [2.0] * 6
if info.is_main:
    print(f"lingering={lingering_process_group()}", flush=True)
sys.exit(finish_process(0))
