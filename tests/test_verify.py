"""Targets met as measured: the search times its children (a fake GPU here), corrects the costs, searches again."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from puzzle.core.artifacts import read_json, write_json
from puzzle.core.notices import read_warnings
from puzzle.core.workloads import Workload
from puzzle.costs.estimate import estimate_workload
from puzzle.costs.schema import SCHEMA
from puzzle.costs.stage import CostsConfig
from puzzle.costs.table import predict
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.memory import memory_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.search.correction import Equation, corrected_table, fit_factors, part_costs
from puzzle.stages.search.stage import ConstraintSpec, SearchConfig, load_inputs, run_search

LAYERS = 6
PARENT = BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(128))
VARIANTS = [PARENT,
            BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(128)),
            BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(64)),
            BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(128)),
            BlockConfig(AttentionConfig.gqa(2), FFNConfig.linear()),
            BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(128))]
GEN = Workload("gen", 64, 128, 256)
DEVICE = "fake-gpu"


def _write_run(run_dir, kind="measured", seed=0):
    """Scores and costs of a 6-layer model; the costs labelled as measured on DEVICE (with a scale calibration)."""
    model = tiny_llama_config(num_layers=LAYERS, hidden_size=256, num_heads=4, num_kv_heads=2,
                              intermediate_size=128, vocab_size=512)
    cfg = CostsConfig(mode="estimate", peak_flops=1e12, mem_bandwidth=1e10)
    atts = list(dict.fromkeys(b.attention for b in VARIANTS))
    ffns = list(dict.fromkeys(b.ffn for b in VARIANTS))
    body = estimate_workload(model, atts, ffns, GEN, cfg, GEN.prompt_len + GEN.gen_len // 2)
    key = DEVICE if kind == "measured" else "estimate"
    calibration = {"method": "scale", "prefill_scale": 1.1, "decode_scale": 0.9} if kind == "measured" else None
    write_json(run_dir / "costs" / f"{key}-{GEN.name}.json", {
        "schema": SCHEMA, "kind": kind, "device": key, "device_key": key, "dtype": "bfloat16",
        "workload": GEN.to_dict(), **body, "calibration": calibration, "parent_memory": memory_model(model, GEN, 2)})
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(LAYERS):
        rows = []
        for j, b in enumerate(VARIANTS):
            kl = 0.0 if j == 0 else float(0.1 + rng.random() * j)
            rows.append({"block": b.to_dict(), "name": b.name, "kl": kl})
        layers.append({"layer": i, "candidates": rows})
    write_json(run_dir / "scores" / "scores.json", {
        "parent": {"kl": 0.0}, "parent_blocks": [PARENT.to_dict()] * LAYERS, "layers": layers})


class FakeGPU:
    """Times a model from the run's costs with a known systematic bias: some variants are slower than costed."""

    def __init__(self, run_dir, bias: dict[tuple[str, str], float]):
        self.data = read_json(run_dir / "costs" / f"{DEVICE}-{GEN.name}.json")
        self.true = copy.deepcopy(self.data)
        for (part, name), factor in bias.items():
            for key in ("prefill_s", "decode_step_s"):
                self.true[part][name][key] *= factor
        self.calls: list[list[str]] = []

    def __call__(self, blocks, workload):
        self.calls.append([b.name for b in blocks])
        p = predict(list(blocks), self.true, workload)
        return {"ttft_s": p["prefill_s"], "decode_s": p["decode_s"], "total_s": p["total_s"],
                "output_tokens_per_s": p["output_tokens_per_s"], "graphs": "fake"}

    def speedup(self, block_names) -> float:
        by_name = {b.name: b for b in VARIANTS}
        child = predict([by_name[n] for n in block_names], self.true, GEN)["total_s"]
        return predict([PARENT] * LAYERS, self.true, GEN)["total_s"] / child


BIAS = {("attention", "linear"): 1.8, ("ffn", "linear"): 1.5, ("attention", "gqa1"): 1.3}


def test_a_missed_target_is_corrected_in_rounds_until_the_child_meets_it_as_measured(tmp_path, capsys):
    _write_run(tmp_path)
    fake = FakeGPU(tmp_path, BIAS)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")], verify_rounds=4)
    result = json.loads(run_search(tmp_path, cfg, measure=fake).read_text())
    verify = result["verify"]
    history = verify["history"]
    assert verify["status"] == "verified" and verify["rounds"] == len(history) >= 2
    first = history[0]["solutions"][0]["checks"][0]
    assert not first["met"] and first["measured"] < 1.25 <= first["predicted"]  # the uncorrected costs lied
    assert history[0]["correction"]["gen"]["decode"]  # the correction fitted after the miss is recorded
    factors = verify["factors"]["gen"]["decode"]
    assert any(factors[k] > 1.05 for k in ("attention/linear", "ffn/linear", "attention/gqa1") if k in factors)
    (sol,) = result["solutions"]
    assert sol["verify"]["meets_target"] and sol["verify"]["round"] == verify["rounds"]
    check = sol["verify"]["checks"][0]
    assert check["measured"] >= 1.25 and check["measured"] == pytest.approx(fake.speedup(sol["block_names"]))
    assert verify["parent_measured"]["gen"]["output_tokens_per_s"] > 0
    # Every model was timed once (the parent too), and every timing is in verify.json.
    assert len(fake.calls) == len({tuple(c) for c in fake.calls})
    timings = read_json(tmp_path / "search" / "verify.json")
    assert len(timings["measurements"]) == len(fake.calls)
    assert "round 1" in capsys.readouterr().out
    assert read_warnings(tmp_path) == []


def test_bounded_rounds_stop_and_flag_the_child_with_a_warning(tmp_path):
    _write_run(tmp_path)
    fake = FakeGPU(tmp_path, BIAS)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")], verify_rounds=1)
    result = json.loads(run_search(tmp_path, cfg, measure=fake).read_text())
    assert result["verify"]["status"] == "missed" and result["verify"]["rounds"] == 1
    assert len(fake.calls) == 2  # the parent and the one child: no second search
    (sol,) = result["solutions"]
    assert sol["verify"]["meets_target"] is False
    (warning,) = read_warnings(tmp_path)
    assert warning["stage"] == "search" and sol["name"] in warning["message"]
    assert "measured" in warning["message"] and "predicted" in warning["message"] and "1.25x" in warning["message"]


def test_every_point_of_a_sweep_is_verified(tmp_path):
    _write_run(tmp_path)
    fake = FakeGPU(tmp_path, BIAS)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1x", "gen")], sweep=["1.1x", "1.25x"],
                       verify_rounds=5)
    result = json.loads(run_search(tmp_path, cfg, measure=fake).read_text())
    assert result["verify"]["status"] == "verified"
    for sol in result["solutions"]:
        target = float(sol["target"].rstrip("x"))
        assert sol["verify"]["meets_target"] and fake.speedup(sol["block_names"]) >= target


def test_unbiased_costs_verify_in_one_round_with_no_correction(tmp_path):
    _write_run(tmp_path)
    fake = FakeGPU(tmp_path, {})
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")])
    result = json.loads(run_search(tmp_path, cfg, measure=fake).read_text())
    assert result["verify"]["rounds"] == 1 and result["verify"]["factors"] == {}
    check = result["solutions"][0]["verify"]["checks"][0]
    assert check["measured"] == pytest.approx(check["predicted"])  # the fake is the cost model itself


def test_estimated_costs_skip_the_check_with_a_notice(tmp_path, capsys):
    _write_run(tmp_path, kind="estimate")

    def never(blocks, workload):
        raise AssertionError("an estimate must not be verified")

    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")])
    result = json.loads(run_search(tmp_path, cfg, measure=never).read_text())
    assert result["verify"]["status"] == "skipped" and "estimate" in result["verify"]["reason"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in out if "not checked by measurement" in line]) == 1
    assert not (tmp_path / "search" / "verify.json").exists()


def test_zero_rounds_disable_the_check(tmp_path):
    _write_run(tmp_path)

    def never(blocks, workload):
        raise AssertionError("verify_rounds=0 measures nothing")

    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")], verify_rounds=0)
    result = json.loads(run_search(tmp_path, cfg, measure=never).read_text())
    assert result["verify"]["status"] == "skipped"


def test_unit_factors_reproduce_the_cost_table(tmp_path):
    _write_run(tmp_path)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")])
    inputs = load_inputs(tmp_path, cfg)
    table = inputs.tables["gen"]
    parts = part_costs(read_json(tmp_path / "costs" / f"{DEVICE}-gen.json"), inputs.candidates, GEN)
    same = corrected_table(table, parts, {})
    for a, b in zip(table.total_s + table.prefill_s, same.total_s + same.prefill_s):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    doubled = corrected_table(table, parts, {"decode": {"attention/linear": 2.0}})
    linear = next(k for k, b in enumerate(inputs.candidates[0]) if b.attention.kind == "linear")
    assert doubled.total_s[0][linear] > table.total_s[0][linear]
    assert doubled.total_s[0][0] == pytest.approx(table.total_s[0][0])  # the parent's block is untouched


def test_one_equation_spreads_the_error_in_proportion_to_cost():
    eq = Equation(fixed=1.0, cost={"a": 2.0, "b": 6.0}, measured=11.0)  # predicted 9, measured 11
    f = fit_factors([eq])
    assert f["a"] == pytest.approx(f["b"], rel=1e-6)  # one common factor
    assert 1.0 + 2.0 * f["a"] + 6.0 * f["b"] == pytest.approx(11.0, rel=1e-3)
    # With "a" the parent's variant, held at the factor the parent's own run gives it, "b" takes the error.
    parent = fit_factors([Equation(fixed=1.0, cost={"a": 8.0}, measured=9.0)])  # measured as predicted
    g = fit_factors([eq], pinned={"a": parent["a"]})
    assert g["a"] == pytest.approx(1.0, abs=1e-3)
    assert 1.0 + 2.0 * g["a"] + 6.0 * g["b"] == pytest.approx(11.0, rel=1e-3)


def test_without_a_gpu_measured_costs_are_not_checked_here(tmp_path, capsys):
    _write_run(tmp_path)
    (tmp_path / "parent").mkdir()
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")])
    result = json.loads(run_search(tmp_path, cfg).read_text())  # this machine has no GPU: no measurer
    assert result["verify"]["status"] == "skipped" and "no GPU" in result["verify"]["reason"]
    assert "not checked by measurement" in capsys.readouterr().out


def test_a_child_that_cannot_be_timed_is_a_clear_error():
    from puzzle.core.errors import PuzzleError
    from puzzle.stages.search.verify import time_child

    parent = tiny_llama_config(num_layers=2)
    with pytest.raises(PuzzleError, match="could not time a child on workload 'gen'.*GPU"):
        time_child(parent, [PARENT] * 2, GEN, "cpu", "float32", "auto")  # eval times on CUDA only



def test_summary_shows_predicted_measured_at_search_and_rounds(tmp_path, capsys):
    from puzzle.stages.report.summary import print_summary, summary_rows

    _write_run(tmp_path)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.25x", "gen")], verify_rounds=1)
    run_search(tmp_path, cfg, measure=FakeGPU(tmp_path, BIAS))  # one round: the child misses
    sol = read_json(tmp_path / "search" / "solutions.json")["solutions"][0]
    write_json(tmp_path / "eval" / "eval.json", {"models": {"parent": {}, sol["name"]: {}}})
    header, rows, workload = summary_rows(tmp_path)
    assert workload == "gen"
    col = {h: i for i, h in enumerate(header)}
    parent, child = rows
    assert parent[col["search meas. x"]] == "1.000"
    assert child[col["search meas. x"]] == f"{sol['verify']['measured']['gen']['speedup']:.3f} MISSED"
    assert child[col["rounds"]] == "1"
    assert child[col["pred. speed-up"]] == f"{sol['predicted']['gen']['speedup']:.2f}"
    print_summary(tmp_path)
    out = capsys.readouterr().out
    assert "1 round(s)" in out and "misses its throughput target" in out
