"""Graph modes that only the benchmarks compare: a whole-step torch.compile of the runtime's decode step.

The library's modes are "fused" (default on CUDA), "manual" and "none" (`puzzle.runtime.engine`). "compile"
compiles the whole decode step with torch.compile(mode="reduce-overhead") (its own CUDA graphs) instead of
the per-sub-block regions and the runtime's manual capture; prefill runs eagerly.

    from _graph_modes import run_workload
    run_workload(model, workload, "compile")  # any library mode works too
"""

from __future__ import annotations

from typing import Any

import torch

from puzzle.core.workloads import Workload
from puzzle.model.decoder import PuzzleModel
from puzzle.runtime import bench
from puzzle.runtime.engine import Engine

BENCHMARK_MODES = ("compile",)


class CompiledStepEngine(Engine):
    """Graph mode "compile" on CUDA (eager, as "none", on CPU): the decode step, eager kernels, as one
    torch.compile "reduce-overhead" graph per attended prefix length (bucketed as the captured modes)."""

    def __init__(self, model: PuzzleModel, batch_size: int, max_seq_len: int, graphs: str = "compile",
                 bucket: int = 256, fuse: bool | None = None) -> None:
        super().__init__(model, batch_size, max_seq_len, graphs="none", bucket=bucket, fuse=fuse)
        if self.device.type == "cuda":
            self.graph_mode = "compile"
        self._compiled: Any = None

    def _run_step(self, attend_len: int) -> None:
        if self.graph_mode != "compile":
            return super()._run_step(attend_len)
        if self._compiled is None:
            for t in [self.valid, self.pad, self.slot, self.ids, self.logits, *self.cache.tensors()]:
                torch._dynamo.mark_static_address(t)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
        self._compiled(attend_len)
        return None


def engine_class(mode: str) -> type[Engine]:
    return CompiledStepEngine if mode == "compile" else Engine


def run_workload(model: PuzzleModel, w: Workload, mode: str, **kwargs: Any) -> dict[str, Any]:
    """`puzzle.runtime.bench.run_workload` in any graph mode, the library's or a benchmark's own."""
    return bench.run_workload(model, w, graphs=mode if mode not in BENCHMARK_MODES else "none",
                              engine_cls=engine_class(mode), **kwargs)
