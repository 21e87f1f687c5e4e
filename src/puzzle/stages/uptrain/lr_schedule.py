"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based) of `steps`: (step + 1) / warmup during the first `warmup`
    steps, then a cosine from 1 down to `min_ratio` at step `steps` (held there beyond it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
