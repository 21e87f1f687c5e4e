"""The max-params baseline under a parameter budget (a subset-sum): solved in seconds, HiGHS kept quiet."""

from __future__ import annotations

import time

import numpy as np

from puzzle.stages.search import mip


def _budget_problem(seed: int) -> tuple[mip.Problem, list[np.ndarray], float]:
    rng = np.random.default_rng(seed)
    params = [np.sort(rng.integers(1_000_000, 50_000_000, 12)) for _ in range(32)]
    times = [p * 1e-9 + rng.random(12) * 1e-4 for p in params]
    budget = 0.6 * sum(p.max() for p in params)
    constraints = [mip.Constraint("params", params, upper=budget),
                   mip.Constraint("time", times, upper=0.7 * sum(t.max() for t in times))]
    return mip.Problem([rng.random(12) for _ in range(32)], constraints), params, budget


def test_max_params_baseline_under_a_params_budget_is_fast_quiet_and_near_the_budget(capfd) -> None:
    problem, params, budget = _budget_problem(2)
    start = time.perf_counter()
    sol = mip.max_params_baseline(problem, params, time_limit_s=30.0)
    assert time.perf_counter() - start < 15  # an exact subset-sum proof runs into the 30 s limit
    assert sol is not None and sol.optimal and problem.feasible(sol.choice)
    assert problem.constraints[0].value(sol.choice) >= (1 - mip.MAX_PARAMS_REL_GAP) * budget
    out, _ = capfd.readouterr()
    assert "Highs" not in out


def test_a_time_limited_solve_says_so_and_prints_nothing(capfd) -> None:
    problem, params, _ = _budget_problem(2)
    sol = mip.solve(problem.with_objective([-p.astype(float) for p in params]), time_limit_s=1.0)
    assert sol is not None and not sol.optimal
    out, _ = capfd.readouterr()
    assert out == ""


def test_a_time_limited_baseline_is_reported_in_solutions_and_warnings(tmp_path, monkeypatch) -> None:
    from puzzle.core.artifacts import read_json
    from puzzle.core.notices import read_warnings
    from puzzle.stages.search.stage import SearchConfig, run_search
    from puzzle.stages.search.targets import ConstraintSpec
    from test_search import _write_run

    _write_run(tmp_path)
    real = mip.max_params_baseline

    def stopped(problem, params, **kwargs):  # as if HiGHS hit search.time_limit_s
        sol = real(problem, params, **kwargs)
        return None if sol is None else mip.Solution(sol.choice, sol.objective, optimal=False)

    monkeypatch.setattr(mip, "max_params_baseline", stopped)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.3x", "gen"), ConstraintSpec("params", "1.5M")],
                       time_limit_s=7)
    result = read_json(run_search(tmp_path, cfg))
    statuses = {b["method"]: b.get("status") for b in result["baselines"] if b["feasible"]}
    assert statuses == {"greedy": "heuristic", "max_params": "time limit"}
    (warning,) = [w["message"] for w in read_warnings(tmp_path) if "baseline" in w["message"]]
    assert "max_params" in warning and "time_limit_s=7 s" in warning
