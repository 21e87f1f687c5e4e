"""Width-consistent costs: violations found, re-measured through an injected timer, fitted, recorded."""

from __future__ import annotations

import copy
import json
from itertools import pairwise
from pathlib import Path

import pytest

from puzzle.core.workloads import DEFAULT_WORKLOADS, Workload
from puzzle.costs.consistency import PHASES, chains, check, isotonic_fit, main, violations
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.costs.table import block_costs, predict
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.presets import tiny_llama_config

A, F = AttentionConfig, FFNConfig
REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reference_ref_s"
PARENT = tiny_llama_config(num_layers=3, num_kv_heads=4)
SPACE = [BlockConfig(a, f) for a in (A.gqa(4), A.gqa(2), A.gqa(1), A.linear(), A.no_op())
         for f in (F.swiglu(128), F.swiglu(64), F.linear(), F.no_op())]
WL = Workload("small", 2, 16, 8)
CPU = {"mode": "measure", "device": "cpu", "dtype": "float32", "repeats": 2, "warmup": 1, "input_sets": 1,
       "decode_inner": 1, "neighbours": 2}

# A fake device: a layer's decode step is its attention + its FFN time; prefill is 10x. Consistent widths.
ATT = {"gqa4": 4.0, "gqa2": 2.0, "gqa1": 1.0, "linear": 0.5, "no_op": 0.0}
FFN = {"swiglu128": 8.0, "swiglu64": 5.0, "linear": 1.5, "no_op": 0.0}
BASE = 100.0


def fake_timer(bumps: dict[str, list[float]], calls: list[str]):
    """Times a model from ATT/FFN; the k-th timing of the stack of attention variant `name` adds bumps[name][k]
    per layer to its decode step (a list shorter than the timings: 0 afterwards)."""
    def timer(config, w, ctx, cfg, device, gen):
        name = config.blocks[0].attention.name
        is_variant_stack = config.vocab_size == 64 and config.blocks[0].ffn.name != "no_op" and name != "no_op"
        extra = 0.0
        if is_variant_stack:
            k = calls.count(name)
            calls.append(name)
            extra = bumps.get(name, [])[k] if k < len(bumps.get(name, [])) else 0.0
        step = BASE + sum(ATT[b.attention.name] + FFN[b.ffn.name] + extra for b in config.blocks)
        return [10 * step], [step]
    return timer


def _monotone(costs: dict) -> bool:
    return all(costs[part][a][phase] <= costs[part][b][phase]
               for part, names in chains(costs).items() for a, b in pairwise(names) for phase in PHASES)


def _reference_as_measured(tmp_path: Path) -> Path:
    """The reference run's costs file with its first, unrepaired measurements (kept under consistency.raw)
    put back in place of the repaired values: what the check saw on the H200."""
    data = json.loads((REFERENCE / "nvidia-h200-text-generation-1k.json").read_text())
    raw = data.pop("consistency")["raw"]
    for part, variants in raw.items():
        for name, values in variants.items():
            data[part][name].update(values)
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(data))
    return path


def test_committed_reference_costs_violate_and_the_fit_repairs_them(tmp_path):
    """The reference run's measured costs break the width order (gqa4 decodes slower than gqa8; swiglu64
    prefills slower than swiglu192); the check lists those pairs and the fit is monotone."""
    data = json.loads(_reference_as_measured(tmp_path).read_text())
    original = copy.deepcopy(data)
    assert not _monotone(data)
    fitted, section = check(data)
    assert data == original  # the check works on a copy
    found = {(v["part"], v["phase"], v["narrow"], v["wide"]): v for v in section["violations"]}
    gqa = found["attention", "decode_step_s", "gqa4", "gqa8"]
    assert gqa["beyond_spread"] and gqa["excess_s"] == pytest.approx(gqa["narrow_s"] - gqa["wide_s"])
    assert gqa["excess_s"] > 10 * gqa["spread_s"]
    assert found["ffn", "prefill_s", "swiglu64", "swiglu192"]["beyond_spread"]
    assert _monotone(fitted)
    adjusted = {(a["part"], a["variant"], a["phase"]): a for a in section["adjusted"]}
    assert adjusted["attention", "gqa4", "decode_step_s"]["measured_s"] == data["attention"]["gqa4"]["decode_step_s"]
    assert fitted["attention"]["gqa4"]["decode_step_s"] == adjusted["attention", "gqa4", "decode_step_s"]["adjusted_s"]
    # Values the fit left alone are the measured ones, bit for bit; no-op and linear are outside the chains.
    assert fitted["attention"]["gqa1"]["decode_step_s"] == data["attention"]["gqa1"]["decode_step_s"]
    assert fitted["ffn"]["linear"] == data["ffn"]["linear"] and "linear" not in section["chains"]["ffn"]
    assert section["raw"]["attention"]["gqa4"]["decode_step_s"] == data["attention"]["gqa4"]["decode_step_s"]


def test_the_tool_prints_the_violations_of_committed_files(capsys, tmp_path):
    assert main([str(_reference_as_measured(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "gqa4" in out and "BEYOND SPREAD" in out and "fit: attention:gqa4 decode_step_s" in out
    # The committed file itself is already consistent: nothing left to fit.
    assert main([str(REFERENCE / "nvidia-h200-text-generation-1k.json")]) == 0
    assert "fit:" not in capsys.readouterr().out


def test_noise_is_remeasured_away_through_the_injected_timer():
    """gqa2 times slower than gqa4 the first time only: it and gqa4 are timed again (bounded rounds) until the
    pair agrees with the width order; no fit is needed, and the file records all of it."""
    calls: list[str] = []
    cfg = CostsConfig(consistency_remeasure=2, **CPU)
    data = costs_for_workload(PARENT, SPACE, WL, cfg, timer=fake_timer({"gqa2": [5.0]}, calls))
    sec = data["consistency"]
    v = [x for x in sec["violations"] if x["phase"] == "decode_step_s"]
    assert [(x["narrow"], x["wide"], x["beyond_spread"]) for x in v] == [("gqa2", "gqa4", True)]
    assert sec["raw"]["attention"]["gqa2"]["decode_step_s"] == pytest.approx(ATT["gqa2"] + 5.0)
    # round 1: the median of two timings (7 and 2) is still slower than gqa4; round 2 settles it
    assert [sorted(r["variants"]) for r in sec["remeasured"]] == [["attention:gqa2", "attention:gqa4"]] * 2
    assert calls.count("gqa2") == 3 and calls.count("gqa1") == 1
    assert sec["remaining"] == [] and sec["adjusted"] == []
    assert data["attention"]["gqa2"]["decode_step_s"] == pytest.approx(ATT["gqa2"])
    assert _monotone(data)


def test_a_lasting_violation_is_fitted_and_predict_uses_the_fit():
    """gqa2 always times slower than gqa4: re-measured at most `consistency_remeasure` times, then the isotonic
    fit pools the pair; the calibration and `predict` see the fitted values."""
    calls: list[str] = []
    cfg = CostsConfig(consistency_remeasure=1, **CPU)
    data = costs_for_workload(PARENT, SPACE, WL, cfg, timer=fake_timer({"gqa2": [3.0] * 10}, calls))
    sec = data["consistency"]
    assert calls.count("gqa2") == 2 and len(sec["remeasured"]) == 1
    assert [(x["narrow"], x["wide"]) for x in sec["remaining"] if x["phase"] == "decode_step_s"] == [("gqa2", "gqa4")]
    adjusted = {(a["variant"], a["phase"]): a for a in sec["adjusted"]}
    assert adjusted["gqa2", "decode_step_s"]["measured_s"] == pytest.approx(5.0)
    # gqa4 is the parent's attention: the whole-parent calibration anchors it, so gqa2 comes down to it
    assert sec["anchors"] == ["attention:gqa4", "ffn:swiglu128"]
    assert adjusted["gqa2", "decode_step_s"]["adjusted_s"] == data["attention"]["gqa4"]["decode_step_s"] == 4.0
    assert ("gqa4", "decode_step_s") not in adjusted
    # without anchors, equal spreads pool the pair at its mean
    _, free = check({**data, "attention": {**data["attention"], "gqa2": sec["raw"]["attention"]["gqa2"]}})
    assert {a["variant"]: a["adjusted_s"] for a in free["adjusted"] if a["phase"] == "decode_step_s"} == \
        pytest.approx({"gqa2": 4.5, "gqa4": 4.5})
    assert data["attention"]["gqa1"]["decode_step_s"] == pytest.approx(ATT["gqa1"])
    assert _monotone(data) and violations(data) == []
    block = BlockConfig(A.gqa(2), F.swiglu(64))
    cal = data["calibration"]
    assert block_costs(data, block)["decode_step_s"] == pytest.approx((4.0 + FFN["swiglu64"]) * cal["decode_scale"])
    assert predict(PARENT, data)["decode_step_s"] == pytest.approx(cal["parent_measured"]["decode_step_s"])
    assert isotonic_fit([5.0, 4.0], [0.0, 0.0], [False, True]) == [4.0, 4.0]


def test_no_remeasure_rounds_when_switched_off():
    calls: list[str] = []
    cfg = CostsConfig(consistency_remeasure=0, **CPU)
    data = costs_for_workload(PARENT, SPACE, WL, cfg, timer=fake_timer({"gqa2": [3.0]}, calls))
    assert calls.count("gqa2") == 1 and data["consistency"]["remeasured"] == []
    assert data["consistency"]["adjusted"] and _monotone(data)
    from puzzle.core.errors import PuzzleError

    with pytest.raises(PuzzleError, match="consistency_remeasure"):
        CostsConfig(consistency_remeasure=-1)


def test_precise_measurements_move_less_in_the_fit():
    # narrow 2.0 +- 0.01 above wide 1.0 +- 1.0: the fit trusts the precise one
    narrow, wide = isotonic_fit([2.0, 1.0], [0.01, 1.0])
    assert narrow == pytest.approx(wide) and narrow > 1.99
    assert isotonic_fit([1.0, 2.0, 3.0], [0.1, 0.1, 0.1]) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("workload", DEFAULT_WORKLOADS, ids=lambda w: w.name)
def test_analytic_estimates_respect_the_width_order(workload):
    data = costs_for_workload(PARENT, SPACE, workload, CostsConfig(mode="estimate"))
    assert data["consistency"]["violations"] == [] and data["consistency"]["adjusted"] == []
    assert data["consistency"]["chains"] == {"attention": ["gqa1", "gqa2", "gqa4"], "ffn": ["swiglu64", "swiglu128"]}
    assert _monotone(data)


def test_the_report_lists_the_adjusted_costs(tmp_path):
    from puzzle.stages.report.stage import ReportConfig, run_report

    data = json.loads(_reference_as_measured(tmp_path).read_text())
    fitted, section = check(data)
    (tmp_path / "costs").mkdir()
    (tmp_path / "costs" / "nvidia-h200-text-generation-1k.json").write_text(json.dumps({**fitted,
                                                                                          "consistency": section}))
    text = run_report(tmp_path, ReportConfig(plots=False)).read_text()
    assert "## Per-variant costs made width-consistent" in text
    gqa4 = next(line for line in text.splitlines() if "attention:gqa4 | decode_step_s" in line)
    fit = next(a for a in section["adjusted"] if (a["variant"], a["phase"]) == ("gqa4", "decode_step_s"))
    cells = [c.strip() for c in gqa4.strip("|").split("|")]
    assert cells[0] == "text-generation-1k"
    assert float(cells[3]) == pytest.approx(fit["measured_s"] * 1e6, rel=1e-3)
    assert float(cells[4]) == pytest.approx(fit["adjusted_s"] * 1e6, rel=1e-3)
    assert fit["adjusted_s"] < fit["measured_s"]
