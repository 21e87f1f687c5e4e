"""Timing done properly: warm-up, CUDA events (wall clock on CPU), medians and spreads; device names."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_key(device: torch.device | str) -> str:
    """A file-name-safe device id, e.g. 'nvidia-h200', 'cpu'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
               inner: int = 1) -> list[float]:
    """Seconds per call of `fn`, one sample per repeat (each the mean of `inner` back-to-back calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return samples


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and relative spread (inter-quartile range / median) of timing samples."""
    med = statistics.median(samples)
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = max(samples) - min(samples)
    return {"median_s": med, "rel_spread": iqr / med if med > 0 else 0.0, "samples": len(samples)}


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a device-to-device copy (each byte read once, written once)."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    samples = time_calls(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return 2 * nbytes / statistics.median(samples)
