"""The whole GKD optimizer step as one CUDA graph (one process on one GPU).

A small child's step is thousands of small kernels; launched one by one from Python the host, not the GPU,
sets the pace. Captured once, a step is one `CUDAGraph.replay()`: teacher and student forwards over every
micro-batch of the accumulation window, backward, gradient clipping (foreach, no host sync) and the AdamW
step (fused, capturable, with the learning rate read from a device tensor that is refilled from the
scheduler before each replay). The batch is copied into a static input buffer; the step's metric vector comes
back in a static output that the caller copies into its `MetricHistory`.

The first `warmup` calls run the same step eagerly on a side stream (real training steps, as PyTorch's
capture recipe asks), the next one captures and replays. If capture raises (something in the model is not
capturable) the step is redone eagerly, a warning is kept, and the caller trains eagerly from then on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from puzzle.core.notices import warn
from puzzle.stages.uptrain.step import train_step

if TYPE_CHECKING:
    from puzzle.stages.uptrain.stage import UptrainConfig


def use_cuda_graphs(setting: str, mode: str, device: torch.device) -> bool:
    """'auto': graphs on one process on CUDA; 'on' insists (the caller checked it can); 'off' never."""
    return setting != "off" and mode == "none" and device.type == "cuda"


class GraphedStep:
    """Call with a host batch [grad_accum, micro, T] (int64) and the group learning rates; returns the step's
    metric vector (a static device tensor, valid until the next call), or None when capture failed and this
    step must be run eagerly by the caller (nothing was changed by the failed attempt)."""

    def __init__(self, child: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, cfg: UptrainConfig,
                 batch_shape: tuple[int, int, int], device: torch.device, autocast: bool,
                 run_dir: Path | None = None, warmup: int = 3) -> None:
        self.child, self.teacher, self.optimizer, self.cfg = child, teacher, optimizer, cfg
        self.autocast, self.run_dir, self.warmup = autocast, run_dir, warmup
        self.ids = torch.zeros(batch_shape, dtype=torch.int64, device=device)  # [grad_accum, micro, T]
        # fp32 on CUDA: what the fused AdamW kernel reads through its lr pointer; elsewhere fp64 = the float
        lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lrs = [torch.zeros((), dtype=lr_dtype, device=device) for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            # a checkpoint written without graphs restores False; capturable exists for accelerators only
            group["capturable"] = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.side: torch.cuda.Stream | None = None
        self.calls = 0
        self.failed = False

    def _body(self) -> torch.Tensor:
        """One step reading the static buffers; the groups hold the lr tensors only while it runs, so the
        scheduler and checkpoints keep seeing plain floats."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs, strict=True):
            g["lr"] = lr
        try:
            return train_step(self.child, self.child, self.teacher, self.optimizer, list(self.ids.unbind(0)),
                              self.cfg, "none", self.autocast, graphed=True)
        finally:
            for g, lr in zip(groups, floats, strict=True):
                g["lr"] = lr

    def __call__(self, batch: torch.Tensor, lrs: list[float]) -> torch.Tensor | None:
        pinned = batch.pin_memory() if self.ids.is_cuda else batch  # pinned: the copy does not block the host
        self.ids.copy_(pinned, non_blocking=True)
        for t, lr in zip(self.lrs, lrs, strict=True):
            t.fill_(lr)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.calls <= self.warmup:
            return self._warm_step()
        try:
            graph, out = self._capture()
        except Exception as e:  # noqa: BLE001 - any capture failure means: train eagerly
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            warn(self.run_dir, "uptrain", f"CUDA-graph capture of the GKD step failed ({type(e).__name__}: "
                 f"{reason}); training eagerly (uptrain.cuda_graphs=off skips the attempt)")
            return None
        self.graph, self.out = graph, out
        graph.replay()  # capture only recorded the step: run it
        return out

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one step (nothing runs yet); its output is a static tensor that every replay rewrites."""
        self.optimizer.zero_grad(set_to_none=True)  # the graph's first backward allocates .grad in its pool
        main = torch.cuda.current_stream(self.ids.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._body()
        finally:
            torch.cuda.set_stream(main)  # when capture_end raises, the capture stream would stay current
        return graph, out

    def _warm_step(self) -> torch.Tensor:
        """An eager step on a side stream (warms up cuBLAS/cuDNN handles and the allocator before capture)."""
        if self.side is None:
            self.side = torch.cuda.Stream(self.ids.device)
        main = torch.cuda.current_stream(self.ids.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self.optimizer.zero_grad(set_to_none=True)
            out = self._body()
        main.wait_stream(self.side)
        out.record_stream(main)  # read on the main stream after it is freed on the side one
        return out
