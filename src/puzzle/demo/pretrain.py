"""Pretrain the demo's tiny parent from scratch with next-token loss (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.core.artifacts import atomic_path
from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.uptrain.lr_schedule import warmup_cosine


@dataclass
class PretrainConfig:
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50  # steps between resumable checkpoints (Ctrl-C loses at most this many)


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    return peak * warmup_cosine(step, total, warmup, 0.1)


def _save_checkpoint(path: Path, model: PuzzleModel, opt: torch.optim.Optimizer, gen: torch.Generator,
                     losses: list[float], cfg: PretrainConfig) -> None:
    with atomic_path(path) as tmp:
        torch.save({"config": asdict(cfg), "step": len(losses), "losses": losses, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "generator": gen.get_state()}, tmp)


def _resume(path: Path | None, model: PuzzleModel, opt: torch.optim.Optimizer, gen: torch.Generator,
            cfg: PretrainConfig) -> list[float]:
    """The losses so far from a checkpoint of the same config (model, optimizer and sampler restored); else []."""
    if path is None or not path.is_file():
        return []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError):
        return []  # unreadable: start over (it is rewritten at the next checkpoint)
    if state.get("config") != asdict(cfg):
        return []  # another config's run
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return list(state["losses"])


def pretrain(model: PuzzleModel, tokens: np.ndarray, cfg: PretrainConfig, progress: bool = True,
             checkpoint: Path | None = None) -> list[float]:
    """Train `model` in place on packed sequences `tokens` [N, T]; returns the loss per step. With `checkpoint`,
    the state is saved there every `cfg.checkpoint_every` steps and an interrupted run resumes from it."""
    if len(tokens) < cfg.batch_size:
        raise PuzzleError(f"pretraining needs at least {cfg.batch_size} sequences, got {len(tokens)}; add text")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    data = torch.from_numpy(tokens.astype(np.int64))
    losses = _resume(checkpoint, model, opt, gen, cfg)
    model.train()
    bar = tqdm(range(len(losses), cfg.steps), desc="pretrain parent", disable=not progress, unit="step",
               initial=len(losses), total=cfg.steps)
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
        if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(checkpoint, model, opt, gen, losses, cfg)
    model.eval()
    return losses
