"""Per-variant time factors fitted to whole models measured on the GPU, and the search's costs corrected by them.

One measured model gives one equation per phase (prefill, decode step) of a workload:

    fixed + sum over its layers of factor_v * cost_v = measured            (seconds)

where cost_v is the variant's calibrated per-layer time from the costs file (`puzzle.costs.table.block_costs`, so the
parent calibration stays) and v runs over attention and FFN variants ("attention/gqa4", "ffn/swiglu512").
`fit_factors` solves the equations by least squares (each scaled to a relative error), ridge-regularised
towards factor 1 with each variant weighted by its share of the measured time: a single equation then scales
every variant it involves by one common factor, i.e. spreads the error in proportion to their cost. The
parent's variants are fitted to the parent's own measurement first and then held (`pinned`), so a child's
error lands on its other variants. `corrected_table` multiplies the costs the MIP reads by those factors; the MIP stays linear.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from puzzle.core.workloads import Workload
from puzzle.costs.table import CostTable, block_costs, fixed_costs
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig

PHASES = ("prefill", "decode")
Factors = dict[str, dict[str, float]]  # phase -> variant key -> multiplicative factor (absent: 1)
RIDGE = 1e-3  # small: the equations are met almost exactly; the ridge only picks how the error is spread
FACTOR_BOUNDS = (0.2, 5.0)  # a correction beyond 5x says the costs file is wrong, not slightly off


def variant_keys(block: BlockConfig) -> tuple[str, str]:
    return f"attention/{block.attention.name}", f"ffn/{block.ffn.name}"


@dataclass(frozen=True)
class PartCosts:
    """Calibrated per-layer times of each candidate's two halves for one workload: what the factors multiply."""

    workload: Workload
    keys: list[list[tuple[str, str]]]  # [layer][candidate] -> (attention key, ffn key)
    times: dict[str, list[np.ndarray]]  # phase -> per layer [C_l, 2]: (attention, ffn) seconds
    fixed: dict[str, float]  # phase -> embedding, head, sampling (+ an "offset" calibration) seconds


def part_costs(data: dict[str, Any], candidates: list[list[BlockConfig]], workload: Workload) -> PartCosts:
    """The halves of every candidate, from the costs JSON through `block_costs` (calibration applied)."""
    keys: list[list[tuple[str, str]]] = []
    times: dict[str, list[np.ndarray]] = {p: [] for p in PHASES}
    for layer in candidates:
        keys.append([variant_keys(b) for b in layer])
        rows = []
        for b in layer:
            a = block_costs(data, BlockConfig(b.attention, FFNConfig.no_op()), workload)
            f = block_costs(data, BlockConfig(AttentionConfig.no_op(), b.ffn), workload)
            rows.append([[a["prefill_s"], f["prefill_s"]], [a["decode_step_s"], f["decode_step_s"]]])
        arr = np.array(rows, dtype=float).reshape(len(layer), 2, 2)  # [C_l, phase, part]
        times["prefill"].append(arr[:, 0])
        times["decode"].append(arr[:, 1])
    fixed = fixed_costs(data, workload)
    return PartCosts(workload, keys, times, {"prefill": fixed["prefill_s"], "decode": fixed["decode_step_s"]})


def _scaled(parts: PartCosts, phase: str, factors: Factors) -> list[np.ndarray]:
    f = factors.get(phase, {})
    out = []
    for keys, t in zip(parts.keys, parts.times[phase]):
        mult = np.array([[f.get(ka, 1.0), f.get(kf, 1.0)] for ka, kf in keys]).reshape(t.shape)  # [C_l, 2]
        out.append((t * mult).sum(axis=1))
    return out


def corrected_table(table: CostTable, parts: PartCosts, factors: Factors) -> CostTable:
    """`table` with every candidate's prefill and total time rebuilt from its halves times the factors."""
    prefill, decode = _scaled(parts, "prefill", factors), _scaled(parts, "decode", factors)
    steps = parts.workload.gen_len - 1  # the first token comes from the prefill
    return replace(table, prefill_s=prefill, total_s=[p + steps * d for p, d in zip(prefill, decode)])


@dataclass(frozen=True)
class Equation:
    """One phase of one measured model: fixed + sum_v factor_v * cost[v] = measured (seconds)."""

    fixed: float
    cost: dict[str, float]  # variant key -> its per-layer time summed over the model's layers
    measured: float


def model_equations(data: dict[str, Any], blocks: list[BlockConfig], workload: Workload,
                    run: dict[str, Any]) -> dict[str, Equation]:
    """phase -> the equation a measured run (`bench.run_workload`'s dict) gives for a model of `blocks`."""
    parts = part_costs(data, [[b] for b in blocks], workload)
    measured = {"prefill": float(run["ttft_s"])}
    if workload.gen_len > 1:
        measured["decode"] = float(run["decode_s"]) / (workload.gen_len - 1)  # one step, sampling included
    out = {}
    for phase, value in measured.items():
        cost: dict[str, float] = defaultdict(float)
        for keys, t in zip(parts.keys, parts.times[phase]):
            for key, seconds in zip(keys[0], t[0]):
                cost[key] += float(seconds)
        out[phase] = Equation(parts.fixed[phase], dict(cost), value)
    return out


def fit_factors(equations: list[Equation], pinned: dict[str, float] | None = None,
                ridge: float = RIDGE) -> dict[str, float]:
    """Per-variant factors that make every equation hold (relative least squares, ridge towards 1); the
    variants in `pinned` keep the factors given there and are not fitted."""
    pinned = dict(pinned or {})
    eqs = [e for e in equations if e.measured > 0]
    keys = sorted({k for e in eqs for k, c in e.cost.items() if c > 0 and k not in pinned})
    if not keys:
        return pinned
    known = [e.fixed + sum(c * pinned.get(k, 1.0) for k, c in e.cost.items()) for e in eqs]  # at factor 1
    a = np.array([[e.cost.get(k, 0.0) / e.measured for k in keys] for e in eqs])  # [E, V]: share of each variant
    b = np.array([(e.measured - k) / e.measured for e, k in zip(eqs, known)])  # [E] relative error
    weight = a.mean(axis=0)  # a variant's typical share: the ridge charges (f - 1)^2 in proportion to it
    lhs = np.vstack([a, np.diag(np.sqrt(ridge * weight))])
    rhs = np.concatenate([b, np.zeros(len(keys))])
    lo, hi = FACTOR_BOUNDS
    fit = lsq_linear(lhs, rhs, bounds=(lo - 1.0, hi - 1.0))
    return {**pinned, **{k: 1.0 + float(d) for k, d in zip(keys, fit.x)}}
