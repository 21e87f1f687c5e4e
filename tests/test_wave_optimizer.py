"""BLD's one optimiser for a wave takes the same steps as one AdamW + clip_grad_norm_ + schedule per variant."""

from __future__ import annotations

import copy

import torch
from torch import nn

from puzzle.stages.library.wave_optimizer import WaveOptimizer


def _variants() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"a": nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6)), "b": nn.Linear(6, 6, bias=False),
            "c": nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6))}


def _losses(modules: dict[str, nn.Module], x: torch.Tensor, scale: dict[str, float]) -> dict[str, torch.Tensor]:
    return {name: scale[name] * m(x).pow(2).mean() for name, m in modules.items()}


def test_matches_one_adamw_and_clip_per_variant() -> None:
    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / 3) * 0.9 ** step

    ours, reference = _variants(), _variants()
    wave = WaveOptimizer({n: list(m.parameters()) for n, m in ours.items()}, lr=0.05, weight_decay=0.1,
                         betas=(0.9, 0.95), schedule=schedule, grad_clip=0.5)
    per_variant = {}
    for n, m in reference.items():
        opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1, betas=(0.9, 0.95))
        per_variant[n] = (opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    # "a" has gradients far above the clip, "b" below it, "c" around it: each is clipped by its own norm
    scale = {"a": 100.0, "b": 0.01, "c": 1.0}
    for step in range(6):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for loss in _losses(ours, x, scale).values():
            loss.backward()
        wave.step()
        for n, loss in _losses(reference, x, scale).items():
            opt, sched = per_variant[n]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference[n].parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    moved = 0.0
    for n in ours:
        for p, q in zip(ours[n].parameters(), reference[n].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        moved += sum(float((p - q).detach().abs().max()) for p, q in zip(ours[n].parameters(), _variants()[n].parameters()))
    assert moved > 0.1  # the comparison is not between two untouched models
    assert all(p.grad is None for m in ours.values() for p in m.parameters())


def test_a_dropped_variant_stops_moving_and_the_others_go_on() -> None:
    ours = _variants()
    wave = WaveOptimizer({n: list(m.parameters()) for n, m in ours.items()}, lr=0.05, weight_decay=0.0,
                         betas=(0.9, 0.95), schedule=lambda s: 1.0, grad_clip=1.0)
    x = torch.randn(4, 6)
    for loss in _losses(ours, x, {"a": 1.0, "b": 1.0, "c": 1.0}).values():
        loss.backward()
    wave.step()
    wave.drop("b")
    frozen = copy.deepcopy(ours["b"].state_dict())
    before_a = copy.deepcopy(ours["a"].state_dict())
    losses = _losses(ours, x, {"a": 1.0, "b": float("nan"), "c": 1.0})  # "b" went non-finite
    for loss in losses.values():
        loss.backward()
    wave.step()
    assert all(torch.equal(v, ours["b"].state_dict()[k]) for k, v in frozen.items())
    assert all(torch.isfinite(p).all() for m in ours.values() for p in m.parameters())
    assert any(not torch.equal(v, ours["a"].state_dict()[k]) for k, v in before_a.items())
    assert not any(p in wave.optimizer.state for p in ours["b"].parameters())  # its state is freed
