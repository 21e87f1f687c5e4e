"""GPU time per kernel while a function runs, through torch.profiler: what the benchmarks' profiles group and
report (CPU op times off the GPU, so the same code runs in the CPU smoke tests)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from puzzle.runtime.timing import sync


def kernel_times(fn: Callable[[], object], device: torch.device, calls: int = 1) -> dict[str, list[float]]:
    """Microseconds of every launch of each kernel (by name) while `fn` runs `calls` times; CUDA kernels on a
    GPU, CPU ops elsewhere."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    per: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if not cuda or e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name].append(e.device_time if cuda else e.cpu_time)
    return per
