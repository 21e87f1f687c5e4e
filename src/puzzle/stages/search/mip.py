"""The multiple-choice MIP behind `puzzle search`, plus the paper's baselines. Pure numpy/scipy, no torch.

One binary x[l, c] per (layer, candidate); exactly one per layer; minimise sum of objective[l][c]
subject to linear constraints  lower <= sum_l coeffs[l][c_l] <= upper  (either side optional).
Solved with `scipy.optimize.milp` (HiGHS). A *choice* is a list with the chosen candidate index per layer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

# Bounds are tightened by this relative amount inside the solver so that HiGHS's feasibility tolerance
# can never let a solution that breaks the user's (un-tightened) constraint through.
_TIGHTEN = 1e-7


@dataclass(frozen=True)
class Constraint:
    name: str
    coeffs: list[np.ndarray]  # per layer, [C_l]
    upper: float | None = None  # sum <= upper
    lower: float | None = None  # sum >= lower

    def value(self, choice: list[int]) -> float:
        return float(sum(c[k] for c, k in zip(self.coeffs, choice)))

    def satisfied(self, choice: list[int], rel_tol: float = 1e-9) -> bool:
        return self.satisfied_value(self.value(choice), rel_tol)

    def satisfied_value(self, v: float, rel_tol: float = 1e-9) -> bool:
        tol = rel_tol * max(1.0, abs(v))
        return (self.upper is None or v <= self.upper + tol) and (self.lower is None or v >= self.lower - tol)

    def violation(self, values: np.ndarray) -> np.ndarray:
        """Relative amount by which `values` (any shape) break the constraint; 0 when satisfied."""
        out = np.zeros_like(values, dtype=float)
        if self.upper is not None:
            out += np.maximum(values - self.upper, 0.0) / max(abs(self.upper), 1e-30)
        if self.lower is not None:
            out += np.maximum(self.lower - values, 0.0) / max(abs(self.lower), 1e-30)
        return out


@dataclass(frozen=True)
class Problem:
    objective: list[np.ndarray]  # per layer, [C_l]; minimised
    constraints: list[Constraint] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.objective)

    def score(self, choice: list[int]) -> float:
        return float(sum(o[k] for o, k in zip(self.objective, choice)))

    def feasible(self, choice: list[int]) -> bool:
        return all(c.satisfied(choice) for c in self.constraints)

    def with_objective(self, objective: list[np.ndarray]) -> Problem:
        return Problem(objective, self.constraints)

    def without(self, index: int) -> Problem:
        return Problem(self.objective, [c for i, c in enumerate(self.constraints) if i != index])


@dataclass(frozen=True)
class Solution:
    choice: list[int]
    objective: float
    optimal: bool  # False when HiGHS stopped at its time limit with a feasible but unproven solution


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send what native code writes to fd 1 to /dev/null for the block (Python's sys.stdout is flushed first)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _offsets(problem: Problem) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(o) for o in problem.objective])])


def solve(problem: Problem, exclude: list[list[int]] | tuple = (), min_diff: int = 1,
          time_limit_s: float = 60.0, rel_gap: float = 0.0) -> Solution | None:
    """The optimal choice, differing from each choice in `exclude` in >= `min_diff` layers; None if infeasible."""
    off = _offsets(problem)
    n, num_layers = int(off[-1]), problem.num_layers
    layer_of = np.repeat(np.arange(num_layers), np.diff(off))
    rows = [LinearConstraint(csr_array((np.ones(n), (layer_of, np.arange(n))), shape=(num_layers, n)), 1, 1)]
    for con in problem.constraints:
        coeffs = np.concatenate(con.coeffs).astype(float)
        # Scale each row to O(1) so that params (1e9) and seconds (1e-3) are equally well conditioned.
        scale = max(float(np.abs(coeffs).max()), abs(con.upper or 0.0), abs(con.lower or 0.0), 1e-30)
        ub = np.inf if con.upper is None else con.upper / scale - _TIGHTEN * max(1.0, abs(con.upper / scale))
        lb = -np.inf if con.lower is None else con.lower / scale + _TIGHTEN * max(1.0, abs(con.lower / scale))
        rows.append(LinearConstraint(coeffs[None, :] / scale, lb, ub))
    for prev in exclude:
        # No-good cut: at most L - min_diff of the previous solution's picks may be kept.
        a = np.zeros(n)
        a[off[:-1] + np.asarray(prev)] = 1.0
        rows.append(LinearConstraint(a[None, :], -np.inf, num_layers - min_diff))
    with _quiet_stdout():  # HiGHS prints internal lines to fd 1 even with disp off
        res = milp(np.concatenate(problem.objective).astype(float), integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=rows, options={"time_limit": time_limit_s, "mip_rel_gap": rel_gap, "disp": False})
    if res.x is None:
        return None  # infeasible (status 2), or no feasible point found in time
    choice = [int(np.argmax(res.x[off[i]:off[i + 1]])) for i in range(num_layers)]
    return Solution(choice, problem.score(choice), bool(res.status == 0))


def solve_diverse(problem: Problem, count: int, min_diff: int, **kwargs: float) -> list[Solution]:
    """Up to `count` solutions, each differing from every earlier one in at least `min_diff` layers."""
    found: list[Solution] = []
    while len(found) < count:
        sol = solve(problem, [s.choice for s in found], min_diff, **kwargs)
        if sol is None:
            break
        found.append(sol)
    return found


def extreme_value(problem: Problem, index: int, maximise: bool, **kwargs: float) -> float | None:
    """The smallest (or largest) value constraint `index` can take while every other constraint holds."""
    con = problem.constraints[index]
    sign = -1.0 if maximise else 1.0
    others = problem.without(index)
    if not others.constraints:
        # Separable: the per-layer extreme is the answer (no solver needed).
        pick = [np.max(c) if maximise else np.min(c) for c in con.coeffs]
        return float(sum(pick))
    sol = solve(others.with_objective([sign * c for c in con.coeffs]), **kwargs)
    return None if sol is None else con.value(sol.choice)


# Most parameters under a parameter budget is a subset-sum: HiGHS finds a child within 1e-5 of the budget at
# once but cannot prove it optimal and runs to its time limit. Within 0.01% of the most parameters is the same
# baseline for comparison.
MAX_PARAMS_REL_GAP = 1e-4


def max_params_baseline(problem: Problem, params: list[np.ndarray], time_limit_s: float = 60.0,
                        rel_gap: float = 0.0) -> Solution | None:
    """The paper's baseline: the child with the most parameters (within MAX_PARAMS_REL_GAP of the most) that
    meets the same constraints; `optimal` False when the time limit stopped the solver first."""
    sol = solve(problem.with_objective([-p.astype(float) for p in params]), time_limit_s=time_limit_s,
                rel_gap=max(rel_gap, MAX_PARAMS_REL_GAP))
    return None if sol is None else Solution(sol.choice, problem.score(sol.choice), sol.optimal)


def greedy_baseline(problem: Problem) -> Solution | None:
    """Greedy budget-constrained pick: start from the best-scoring block of every layer and repeatedly make
    the single-layer swap that removes the most constraint violation per unit of score lost, until every
    constraint holds (None when no swap helps any more)."""
    choice = [int(np.argmin(o)) for o in problem.objective]
    lhs = np.array([c.value(choice) for c in problem.constraints])

    def total_violation(values: np.ndarray) -> np.ndarray:  # values [K, ...] -> [...]
        return sum(c.violation(values[k]) for k, c in enumerate(problem.constraints))

    viol = float(total_violation(lhs[:, None])[0]) if problem.constraints else 0.0
    for _ in range(100 * sum(len(o) for o in problem.objective)):
        if viol <= 0:
            return Solution(choice, problem.score(choice), False)
        best: tuple[float, int, int] | None = None
        for layer, obj in enumerate(problem.objective):
            k = choice[layer]
            # Every alternative for this layer at once: constraint values after the swap, [K, C_l].
            delta = np.stack([c.coeffs[layer] - c.coeffs[layer][k] for c in problem.constraints])
            gain = viol - total_violation(lhs[:, None] + delta)  # [C_l]
            loss = obj - obj[k]
            for cand in np.flatnonzero(gain > 1e-12):
                ratio = max(float(loss[cand]), 0.0) / float(gain[cand]) if loss[cand] > 0 else float(loss[cand])
                if best is None or ratio < best[0]:
                    best = (ratio, layer, int(cand))
        if best is None:
            return None
        _, layer, cand = best
        lhs = lhs + np.array([c.coeffs[layer][cand] - c.coeffs[layer][choice[layer]] for c in problem.constraints])
        choice[layer] = cand
        viol = float(total_violation(lhs[:, None])[0])
    return None
