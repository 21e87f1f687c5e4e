"""The MIP search: brute-force optimality, constraints, diversity, baselines, infeasibility, the stage."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from puzzle.core.artifacts import write_json
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.estimate import estimate_workload
from puzzle.costs.schema import SCHEMA
from puzzle.costs.stage import CostsConfig
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.memory import memory_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.search import mip
from puzzle.stages.search.stage import (
    ConstraintSpec,
    SearchConfig,
    load_inputs,
    parse_target,
    run_search,
    search,
)

# ---- the solver on random instances -------------------------------------------------------------------------


def _random_problem(rng: np.random.Generator, layers: int, cands: int) -> mip.Problem:
    objective = [rng.random(cands) for _ in range(layers)]
    time = [rng.random(cands) for _ in range(layers)]
    mem = [rng.random(cands) for _ in range(layers)]
    attn = [(rng.random(cands) < 0.5).astype(float) for _ in range(layers)]
    constraints = [
        mip.Constraint("time", time, upper=0.4 * layers),
        mip.Constraint("mem", mem, upper=0.6 * layers),
        mip.Constraint("attn", attn, lower=float(layers // 3)),
    ]
    return mip.Problem(objective, constraints)


def _brute_force(problem: mip.Problem, exclude=(), min_diff=1):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in problem.objective]):
        choice = list(choice)
        if not problem.feasible(choice):
            continue
        if any(sum(a != b for a, b in zip(choice, prev)) < min_diff for prev in exclude):
            continue
        score = problem.score(choice)
        if best is None or score < best[0]:
            best = (score, choice)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_mip_objective_equals_brute_force(seed):
    problem = _random_problem(np.random.default_rng(seed), layers=5, cands=4)
    brute = _brute_force(problem)
    sol = mip.solve(problem)
    if brute is None:
        assert sol is None
        return
    assert sol is not None and sol.optimal
    assert problem.feasible(sol.choice)
    assert sol.objective == pytest.approx(brute[0], abs=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_diverse_solutions_differ_and_are_optimal_under_the_cuts(seed):
    problem = _random_problem(np.random.default_rng(100 + seed), layers=5, cands=3)
    k = 2
    sols = mip.solve_diverse(problem, 3, k)
    assert sols, "instance should be feasible"
    for i, a in enumerate(sols):
        assert problem.feasible(a.choice)
        for b in sols[:i]:
            assert sum(x != y for x, y in zip(a.choice, b.choice)) >= k
        brute = _brute_force(problem, [s.choice for s in sols[:i]], k)
        assert a.objective == pytest.approx(brute[0], abs=1e-9)
    assert [s.objective for s in sols] == sorted(s.objective for s in sols)


@pytest.mark.parametrize("seed", range(6))
def test_baselines_never_beat_the_mip(seed):
    rng = np.random.default_rng(200 + seed)
    problem = _random_problem(rng, layers=6, cands=4)
    params = [rng.random(4) for _ in range(6)]
    best = mip.solve(problem)
    for sol in (mip.greedy_baseline(problem), mip.max_params_baseline(problem, params)):
        if sol is None:
            continue
        assert problem.feasible(sol.choice)
        if best is not None:
            assert sol.objective >= best.objective - 1e-9
    maxp = mip.max_params_baseline(problem, params)
    if maxp is not None:  # it really maximises parameters
        brute = _brute_force(problem.with_objective([-p for p in params]))
        assert -brute[0] == pytest.approx(sum(p[k] for p, k in zip(params, maxp.choice)))


# ---- targets ----------------------------------------------------------------------------------------------------


def test_parse_target():
    assert parse_target("throughput", "2x") == (2.0, True)
    assert parse_target("throughput", "1500 tok/s") == (1500.0, False)
    assert parse_target("memory", "80GiB") == (80 * 2**30, False)
    assert parse_target("memory", "24 GB") == (24e9, False)
    assert parse_target("params", "7B") == (7e9, False)
    assert parse_target("latency", "200ms") == (pytest.approx(0.2), False)
    assert parse_target("min_attention_layers", "3") == (3.0, False)
    with pytest.raises(PuzzleError, match="80GiB"):
        parse_target("memory", "eighty gigs")


# ---- the stage on a tiny model with the analytic costs -------------------------------------------------------

LAYERS = 5
VARIANTS = [BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(128)),  # the parent's block
            BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(64)),
            BlockConfig(AttentionConfig.gqa(2), FFNConfig.linear()),
            BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(128)),
            BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())]
WORKLOADS = [Workload("gen", 64, 128, 256), Workload("chat", 1, 64, 64)]


def _write_run(run_dir, seed=0):
    model = tiny_llama_config(num_layers=LAYERS, hidden_size=256, num_heads=4, num_kv_heads=2,
                              intermediate_size=128, vocab_size=512)
    rng = np.random.default_rng(seed)
    cfg = CostsConfig(mode="estimate", peak_flops=1e12, mem_bandwidth=1e10)
    atts = list(dict.fromkeys(b.attention for b in VARIANTS))
    ffns = list(dict.fromkeys(b.ffn for b in VARIANTS))
    for w in WORKLOADS:
        body = estimate_workload(model, atts, ffns, w, cfg, w.prompt_len + w.gen_len // 2)
        write_json(run_dir / "costs" / f"estimate-{w.name}.json", {
            "schema": SCHEMA, "kind": "estimate", "device": "estimate", "device_key": "estimate",
            "dtype": "bfloat16", "workload": w.to_dict(), **body, "parent_memory": memory_model(model, w, 2)})
    layers = []
    for i in range(LAYERS):
        rows = []
        for j, b in enumerate(VARIANTS):
            kl = 0.0 if j == 0 else float(rng.random() * j * (1 + i % 2))
            rows.append({"block": b.to_dict(), "name": b.name, "kl": kl, "lm_loss": 2 + kl, "lm_loss_delta": kl,
                         "top1": 1 - kl / 10, "top5": 1 - kl / 20, "task_accuracy": None})
        layers.append({"layer": i, "candidates": rows})
    write_json(run_dir / "scores" / "scores.json", {
        "parent": {"kl": 0.0, "lm_loss": 2.0}, "parent_blocks": [VARIANTS[0].to_dict()] * LAYERS, "layers": layers})
    return model


def _brute_force_stage(inputs, cfg):
    """Best objective over every child, checking the user-level targets on the predicted costs."""
    best = None
    for choice in itertools.product(*[range(len(c)) for c in inputs.candidates]):
        if _meets(inputs, list(choice), cfg.constraints):
            score = sum(o[k] for o, k in zip(inputs.objective, choice))
            best = score if best is None else min(best, score)
    return best


def _meets(inputs, choice, specs) -> bool:
    blocks = [inputs.candidates[i][k] for i, k in enumerate(choice)]
    for s in specs:
        value, factor = parse_target(s.kind, s.target)
        if s.kind == "min_attention_layers":
            if sum(b.attention.kind == "gqa" for b in blocks) < value:
                return False
            continue
        pred = inputs.tables[s.workload or "gen"].predict(choice)
        parent = inputs.parent_tables[s.workload or "gen"].predict([0] * len(choice))
        got = {"throughput": pred["throughput_tok_s"] / (parent["throughput_tok_s"] if factor else 1.0),
               "latency": pred["latency_s"], "ttft": pred["ttft_s"], "memory": pred["memory_bytes"],
               "params": pred["params"]}[s.kind]
        if (s.kind == "throughput" and got < value * (1 - 1e-9)) or (s.kind != "throughput" and got > value * (1 + 1e-9)):
            return False
    return True


CASES = [
    [ConstraintSpec("throughput", "1.3x", "gen")],
    [ConstraintSpec("throughput", "1.2x", "gen"), ConstraintSpec("memory", "80MiB", "gen"),
     ConstraintSpec("min_attention_layers", "3")],
    [ConstraintSpec("latency", "18ms", "chat"), ConstraintSpec("params", "1.5M")],
    [ConstraintSpec("ttft", "0.025s", "gen"), ConstraintSpec("throughput", "1.1x", "chat")],
]


@pytest.mark.parametrize("specs", CASES)
def test_stage_solutions_meet_every_target_and_match_brute_force(tmp_path, specs):
    _write_run(tmp_path)
    cfg = SearchConfig(constraints=specs, num_solutions=3, min_diff_layers=2)
    inputs = load_inputs(tmp_path, cfg)
    result = search(inputs, cfg)
    sols = result["solutions"]
    assert sols
    for s in sols:
        choice = [inputs.candidates[i].index(BlockConfig.from_dict(b)) for i, b in enumerate(s["blocks"])]
        assert _meets(inputs, choice, specs)
        assert s["predicted"]["gen"]["throughput_tok_s"] > 0 and "chat" in s["predicted"]
    assert sols[0]["objective"] == pytest.approx(_brute_force_stage(inputs, cfg), abs=1e-9)
    for base in result["baselines"]:
        if base["feasible"]:
            assert base["objective"] >= sols[0]["objective"] - 1e-9
            choice = [inputs.candidates[i].index(BlockConfig.from_dict(b)) for i, b in enumerate(base["blocks"])]
            assert _meets(inputs, choice, specs)


def test_infeasible_target_names_the_best_achievable_value(tmp_path):
    _write_run(tmp_path)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "200x", "gen")])
    inputs = load_inputs(tmp_path, cfg)
    parent = inputs.parent_tables["gen"].predict([0] * LAYERS)["throughput_tok_s"]
    fastest = max(inputs.tables["gen"].predict(list(c))["throughput_tok_s"]
                  for c in itertools.product(*[range(len(c)) for c in inputs.candidates]))
    with pytest.raises(PuzzleError) as err:
        search(inputs, cfg)
    msg = str(err.value)
    assert f"the fastest child reaches {fastest / parent:.2f}x" in msg and "asked for 200x" in msg
    assert "\n" not in msg


def test_infeasible_memory_under_another_constraint(tmp_path):
    _write_run(tmp_path)
    cfg = SearchConfig(constraints=[ConstraintSpec("min_attention_layers", "5"),
                                    ConstraintSpec("memory", "1KiB", "gen")])
    with pytest.raises(PuzzleError, match=r"the smallest child needs .* budget 1KiB under the other constraints"):
        search(load_inputs(tmp_path, cfg), cfg)


def test_sweep_writes_pareto_table_and_records_infeasible_targets(tmp_path):
    _write_run(tmp_path)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1x", "gen")], sweep=["1x", "1.3x", "1.6x", "200x"])
    path = run_search(tmp_path, cfg)
    result = json.loads(path.read_text())
    targets = [s["target"] for s in result["solutions"]]
    assert targets == ["1x", "1.3x", "1.6x"]
    assert [i["target"] for i in result["infeasible"]] == ["200x"]
    objectives = [s["objective"] for s in result["solutions"]]
    assert objectives == sorted(objectives)  # tighter targets never score better
    assert objectives[0] == pytest.approx(0.0)  # 1x: the parent itself
    csv_lines = (tmp_path / "search" / "solutions.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,name,target,objective")
    assert sum(line.startswith("mip,") for line in csv_lines) == 3
    assert all(line.endswith(",True") for line in csv_lines if line.startswith("mip,"))  # a sweep is a front
    mtime = path.stat().st_mtime_ns
    run_search(tmp_path, cfg)  # current: nothing to do
    assert path.stat().st_mtime_ns == mtime


def test_missing_metric_and_bad_config_are_errors(tmp_path):
    _write_run(tmp_path)
    with pytest.raises(PuzzleError, match="task_file"):
        load_inputs(tmp_path, SearchConfig(metric="task_accuracy"))
    with pytest.raises(PuzzleError, match="needs a workload"):
        cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "2x")])
        search(load_inputs(tmp_path, cfg), cfg)
