"""Pretrain the demo's tiny parent from scratch with next-token loss (a few minutes on 2 CPU cores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.core.errors import PuzzleError
from puzzle.stages.uptrain.lr_schedule import warmup_cosine
from puzzle.model.decoder import PuzzleModel


@dataclass
class PretrainConfig:
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    return peak * warmup_cosine(step, total, warmup, 0.1)


def pretrain(model: PuzzleModel, tokens: np.ndarray, cfg: PretrainConfig, progress: bool = True) -> list[float]:
    """Train `model` in place on packed sequences `tokens` [N, T]; returns the loss per step."""
    if len(tokens) < cfg.batch_size:
        raise PuzzleError(f"pretraining needs at least {cfg.batch_size} sequences, got {len(tokens)}; add text")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    data = torch.from_numpy(tokens.astype(np.int64))
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain parent", disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        batch = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)]  # [B, T]
        logits = model(batch[:, :-1]).logits  # [B, T-1, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        if not torch.isfinite(loss):
            raise PuzzleError(f"pretraining loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
