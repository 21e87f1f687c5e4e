"""GKD metrics: a sum vector -> per-token means, and the per-step history kept on the device until a flush.

Reading a metric on the host waits for the GPU to finish every kernel queued so far; doing it every step stalls
the host between steps (the next step's launches cannot overlap the current step's kernels). Steps therefore
only copy their metric vector into `MetricHistory` (a device-to-device copy), and `flush` reads all pending
rows at once: every `uptrain.log_every` steps, and before validation, checkpoints and the end of training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from puzzle.core.errors import PuzzleError
from puzzle.stages.uptrain.step import NORM, WIDTH

if TYPE_CHECKING:
    from puzzle.stages.uptrain.stage import UptrainConfig


def metrics_of(sums: list[float], cfg: UptrainConfig) -> dict[str, float]:
    """[cosine, kl, lm, agree, tokens, lm_tokens] summed over tokens -> per-token means and the weighted loss."""
    cos, kl, lm, agree, tokens, lm_tokens = sums[:6]
    m = {"cosine": cos / tokens, "kl": kl / tokens, "lm_loss": lm / max(lm_tokens, 1), "agreement": agree / tokens}
    m["loss"] = cfg.cosine_weight * m["cosine"] + cfg.kl_weight * m["kl"] + cfg.lm_weight * m["lm_loss"]
    return m


class MetricHistory:
    """Up to `capacity` steps' metric vectors on the device, with the host-side facts of each step."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.rows = torch.zeros(capacity, WIDTH, device=device)  # [capacity, WIDTH]
        self.pending: list[tuple[int, float]] = []  # (1-based step, learning rate) per filled row

    def add(self, step: int, vector: torch.Tensor, lr: float) -> bool:
        """Keep one step's vector [WIDTH] (no host sync); True when the history is full and must be flushed."""
        self.rows[len(self.pending)].copy_(vector, non_blocking=True)
        self.pending.append((step, lr))
        return len(self.pending) == len(self.rows)

    def flush(self, cfg: UptrainConfig, tokens_per_step: int) -> list[dict[str, Any]]:
        """One host read of every pending row -> one log record per step, in order. Raises the one-line
        PuzzleError at the first step whose loss is not finite (before any later checkpoint is written)."""
        if not self.pending:
            return []
        values = self.rows[:len(self.pending)].tolist()
        pending, self.pending = self.pending, []
        records = []
        for (step, lr), row in zip(pending, values, strict=True):
            metrics = metrics_of(row, cfg)
            if not math.isfinite(metrics["loss"]):
                raise PuzzleError(
                    f"uptrain loss became {metrics['loss']} at step {step}; lower uptrain.lr or use "
                    "precision=fp32 (the last good checkpoint is kept)"
                )
            if cfg.grad_clip > 0:
                metrics["grad_norm"] = row[NORM]
            records.append({"step": step, "tokens": step * tokens_per_step, **metrics, "lr": lr})
        return records
