"""One optimiser for every variant a wave trains.

AdamW is elementwise, so one AdamW over all variants' parameters with one schedule takes the same steps as one
AdamW per variant; each variant's gradient is still clipped by its own norm. A wave holds hundreds of variants,
and at small model sizes the host launching a few optimiser kernels per variant per step, not the GPU, sets
BLD's pace: here the clipping is one norm kernel for the wave plus one scale per variant, and the update is one
fused AdamW (on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class WaveOptimizer:
    """AdamW + LambdaLR over named parameter groups (one per variant), clipped per group; `drop` stops a group."""

    def __init__(self, groups: dict[str, list[nn.Parameter]], lr: float, weight_decay: float,
                 betas: tuple[float, float], schedule: Callable[[int], float], grad_clip: float) -> None:
        self.groups = {name: list(params) for name, params in groups.items()}
        flat = [p for params in self.groups.values() for p in params]
        fused = bool(flat) and all(p.is_cuda and p.dtype.is_floating_point for p in flat)
        self.optimizer = torch.optim.AdamW(flat, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.grad_clip = grad_clip
        self.dropped: set[str] = set()
        self._owner: tuple[tuple[str, ...], torch.Tensor] | None = None  # live names -> group index per tensor

    def drop(self, name: str) -> None:
        """Stop updating `name` (its loss went non-finite) and free its optimiser state; the rest go on."""
        self.dropped.add(name)
        for p in self.groups[name]:
            p.grad = None
            self.optimizer.state.pop(p, None)

    def step(self) -> None:
        """Clip each live group's gradient to `grad_clip` by its own norm, take one AdamW step, zero the grads."""
        for name in self.dropped:  # a dropped group's grads (if any were computed) must not move it
            for p in self.groups[name]:
                p.grad = None
        if self.grad_clip > 0:
            self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _clip(self) -> None:
        live = [(name, [p.grad for p in params if p.grad is not None])
                for name, params in self.groups.items() if name not in self.dropped]
        live = [(name, grads) for name, grads in live if grads]
        if not live:
            return
        grads = [g for _, grads_of in live for g in grads_of]
        names = tuple(name for name, _ in live)
        if self._owner is None or self._owner[0] != names or self._owner[1].numel() != len(grads):
            owner = [i for i, (_, grads_of) in enumerate(live) for _ in grads_of]
            self._owner = (names, torch.tensor(owner, device=grads[0].device))
        owner_index = self._owner[1]  # [tensors] -> group
        squares = torch.stack(torch._foreach_norm(grads)).float().pow(2)  # [tensors]
        totals = torch.zeros(len(live), device=squares.device).index_add_(0, owner_index, squares).sqrt()  # [groups]
        # the same coefficient torch.nn.utils.clip_grad_norm_ uses, per group
        coefs = (self.grad_clip / (totals + 1e-6)).clamp(max=1.0).unbind(0)
        for (_, grads_of), coef in zip(live, coefs, strict=True):
            torch._foreach_mul_(grads_of, coef.to(grads_of[0].dtype))
