"""Costs: analytic fallback, CPU measurement, memory model vs runtime allocation, device checks, predict."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from puzzle.core.config import load_config
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.measure import parent_halves
from puzzle.costs.schema import load_costs
from puzzle.costs.stage import CostsConfig, costs_for_workload, run_costs
from puzzle.costs.table import predict
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.memory import fits, max_batch_size, memory_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime import Engine

A, F = AttentionConfig, FFNConfig
PARENT = tiny_llama_config(num_layers=3, num_kv_heads=4)
SPACE = [BlockConfig(a, f) for a in (A.gqa(4), A.gqa(2), A.gqa(1), A.linear(), A.no_op())
         for f in (F.swiglu(128), F.swiglu(64), F.linear(), F.no_op())]
WL = Workload("small", 2, 16, 8)


def test_analytic_costs_are_labelled_and_ordered(tmp_path):
    cfg = CostsConfig(mode="estimate")
    written = run_costs(tmp_path, cfg, [WL], SPACE, model_config=PARENT)
    path = written["small"]
    assert path == tmp_path / "costs" / "estimate-small.json"
    data = json.loads(path.read_text())
    assert data["kind"] == "estimate" and "estimate" in data["device"]
    att, ffn = data["attention"], data["ffn"]
    assert att["no_op"]["decode_step_s"] == 0 and ffn["no_op"]["prefill_s"] == 0
    assert att["gqa4"]["kv_bytes_per_token"] == 2 * att["gqa1"]["kv_bytes_per_token"] * 2
    assert att["gqa4"]["decode_step_s"] > att["gqa1"]["decode_step_s"] > 0
    assert ffn["swiglu128"]["prefill_s"] > ffn["swiglu64"]["prefill_s"] > 0
    assert att["gqa4"]["params"] + ffn["swiglu128"]["params"] == PARENT.block_param_count(PARENT.blocks[0])
    # Resumable: a current file is not rewritten.
    mtime = path.stat().st_mtime_ns
    run_costs(tmp_path, cfg, [WL], SPACE, model_config=PARENT)
    assert path.stat().st_mtime_ns == mtime


def test_measured_costs_on_cpu(tmp_path):
    cfg = CostsConfig(mode="measure", device="cpu", dtype="float32", repeats=2, warmup=1,
                      input_sets=1, decode_inner=1, max_stack=2)
    blocks = [BlockConfig(A.gqa(4), F.swiglu(128)), BlockConfig(A.no_op(), F.linear())]
    path = run_costs(tmp_path, cfg, [WL], blocks, model_config=PARENT)["small"]
    data = json.loads(path.read_text())
    assert path.name == "cpu-small.json" and data["kind"] == "measured" and data["device"] == "cpu"
    for part, name in [("attention", "gqa4"), ("ffn", "swiglu128"), ("ffn", "linear")]:
        rec = data[part][name]
        assert rec["decode_step_s"] >= 0 and rec["prefill_s"] >= 0 and rec["stack"] >= 1
    assert data["fixed"]["decode_step_s"] > 0
    assert data["timing"]["median_rel_spread"] is not None
    loaded = load_costs(tmp_path, "small", device="cpu")
    assert predict(PARENT, loaded)["total_s"] > 0


def test_memory_model_equals_runtime_allocation():
    child = PARENT.with_blocks([BlockConfig(A.gqa(4), F.swiglu(128)), BlockConfig(A.no_op(), F.linear()),
                                BlockConfig(A.gqa(1), F.no_op())])
    model = build_model(child, dtype=torch.bfloat16, seed=0)
    w = Workload("m", 3, 10, 6)
    engine = Engine(model, w.batch_size, w.max_seq_len)
    mem = memory_model(child, w, dtype_bytes=2)
    allocated_kv = sum(t.untyped_storage().nbytes() for t in engine.cache.tensors())
    assert mem["kv_cache_bytes"] == engine.cache.nbytes() == allocated_kv
    assert mem["weights_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem["total_bytes"] == mem["weights_bytes"] + mem["kv_cache_bytes"] + mem["activation_bytes"]


def test_max_batch_size_is_the_fitting_boundary():
    budget = 40_000_000
    b = max_batch_size(PARENT, 128, 128, budget)
    assert b >= 1
    assert fits(PARENT, Workload("x", b, 128, 128), budget)
    assert not fits(PARENT, Workload("x", b + 1, 128, 128), budget)


def test_other_device_costs_are_not_used_silently(tmp_path):
    run_costs(tmp_path, CostsConfig(mode="estimate"), [WL], SPACE, model_config=PARENT)
    costs_dir = tmp_path / "costs"
    data = json.loads((costs_dir / "estimate-small.json").read_text())
    data["device_key"], data["kind"], data["device"] = "nvidia-h200", "measured", "NVIDIA H200"
    (costs_dir / "nvidia-h200-small.json").write_text(json.dumps(data))
    (costs_dir / "estimate-small.json").unlink()
    if not torch.cuda.is_available():
        with pytest.raises(PuzzleError, match="not on this device"):
            load_costs(tmp_path, "small")
    assert load_costs(tmp_path, "small", device="nvidia-h200")["device"] == "NVIDIA H200"
    # A file whose content names another device than its name is refused too.
    (costs_dir / "nvidia-h100-small.json").write_text(json.dumps(data))
    with pytest.raises(PuzzleError, match="holds costs of"):
        load_costs(tmp_path, "small", device="nvidia-h100")


def test_predict_sums_blocks_and_prefers_cheaper_children(tmp_path):
    run_costs(tmp_path, CostsConfig(mode="estimate"), [WL], SPACE, model_config=PARENT)
    costs = load_costs(tmp_path, "small", device="estimate")
    parent = predict(PARENT, costs)
    child_blocks = [BlockConfig(A.gqa(1), F.swiglu(64)), BlockConfig(A.no_op(), F.linear()),
                    BlockConfig(A.gqa(4), F.no_op())]
    child = predict(child_blocks, costs)
    expected_step = costs["fixed"]["decode_step_s"] + sum(
        costs["attention"][b.attention.name]["decode_step_s"] + costs["ffn"][b.ffn.name]["decode_step_s"]
        for b in child_blocks)
    assert child["decode_step_s"] == pytest.approx(expected_step)
    assert child["total_s"] == pytest.approx(child["prefill_s"] + (WL.gen_len - 1) * expected_step)
    assert child["output_tokens_per_s"] > parent["output_tokens_per_s"]
    assert child["kind"] == "estimate"
    with pytest.raises(PuzzleError, match="no attention variant"):
        predict([BlockConfig(A.gqa(3), F.no_op())], costs)


def test_bad_config(tmp_path):
    with pytest.raises(PuzzleError, match="dtype"):
        run_costs(tmp_path, CostsConfig(dtype="int8"), [WL], SPACE, model_config=PARENT)
    if not torch.cuda.is_available():
        with pytest.raises(PuzzleError, match="needs a CUDA GPU"):
            run_costs(tmp_path, CostsConfig(mode="measure"), [WL], SPACE, model_config=PARENT)
    with pytest.raises(PuzzleError, match="import"):
        run_costs(tmp_path, CostsConfig(mode="estimate"), [WL], SPACE)


def test_calibration_fits_the_whole_parent_and_search_agrees(tmp_path):
    """Measured costs carry the parent timed whole; calibrated predictions of the parent reproduce it, and the
    search's CostTable adds up exactly what `predict` does."""
    from puzzle.costs.table import block_costs, cost_table_from_json

    cfg = CostsConfig(mode="measure", device="cpu", dtype="float32", repeats=3, warmup=1,
                      input_sets=1, decode_inner=1, max_stack=2)
    child = PARENT.with_blocks([BlockConfig(A.gqa(2), F.swiglu(64)), BlockConfig(A.no_op(), F.linear()),
                                BlockConfig(A.gqa(4), F.no_op())])
    blocks = list(PARENT.blocks) + list(child.blocks)
    data = json.loads(run_costs(tmp_path, cfg, [WL], blocks, model_config=PARENT)["small"].read_text())
    cal = data["calibration"]
    assert data["graphs"] == "none" and cal["method"] == "scale"
    measured = cal["parent_measured"]
    for method in ("scale", "offset"):
        costs = {**data, "calibration": {**cal, "method": method}}
        p = predict(PARENT, costs)
        assert p["decode_step_s"] == pytest.approx(measured["decode_step_s"], rel=1e-9)
        assert p["prefill_s"] == pytest.approx(measured["prefill_s"], rel=1e-9)
        for model in (PARENT, child):
            table = cost_table_from_json(costs, [[b] for b in model.blocks], tmp_path, "cpu", WL.name)
            assert table.predict([0] * model.num_layers)["latency_s"] == pytest.approx(predict(model, costs)["total_s"])
    raw = predict(PARENT, {**data, "calibration": None})
    assert raw["decode_step_s"] == pytest.approx(cal["parent_uncalibrated"]["decode_step_s"])
    # "scale" multiplies each block's time by one factor per phase; no-op blocks stay free.
    b = block_costs(data, child.blocks[0])
    unscaled = block_costs({**data, "calibration": None}, child.blocks[0])
    assert b["decode_step_s"] == pytest.approx(unscaled["decode_step_s"] * cal["decode_scale"])
    assert block_costs(data, BlockConfig(A.no_op(), F.no_op()))["total_s"] == 0.0


# ---- how variants are timed: "neighbourhood" (default) and "isolated" ------------------------------------

CPU_MEASURE = {"mode": "measure", "device": "cpu", "dtype": "float32", "repeats": 2, "warmup": 1,
               "input_sets": 1, "decode_inner": 1, "calibrate": "none"}


def test_neighbourhood_is_the_default_and_isolated_keeps_its_layout(tmp_path):
    cfg = CostsConfig(neighbours=2, max_stack=2, **CPU_MEASURE)
    assert CostsConfig().method == "neighbourhood" and CostsConfig().neighbours == 4
    data = json.loads(run_costs(tmp_path, cfg, [WL], SPACE, model_config=PARENT)["small"].read_text())
    assert data["method"] == "neighbourhood" and data["kind"] == "measured"
    assert len(data["attention"]) == 5 and len(data["ffn"]) == 4
    for part in ("attention", "ffn"):
        for name, rec in data[part].items():
            for key in ("prefill_s", "decode_step_s"):
                assert math.isfinite(rec[key]) and rec[key] >= 0, (part, name, key)
            assert not rec["oom"] and rec["stack"] == (0 if name == "no_op" else 2)
    assert load_costs(tmp_path, "small", device="cpu")["method"] == "neighbourhood"
    assert predict(PARENT, data)["total_s"] > 0
    # Another method is another measurement (the config is part of the inputs hash), in the old layout.
    iso = json.loads(run_costs(tmp_path, replace(cfg, method="isolated"), [WL], SPACE, model_config=PARENT)["small"]
                     .read_text())
    assert iso["method"] == "isolated" and iso["inputs_hash"] != data["inputs_hash"]
    assert set(iso["attention"]) == set(data["attention"]) and set(iso["ffn"]) == set(data["ffn"])
    assert set(iso["attention"]["gqa4"]) == set(data["attention"]["gqa4"])  # the same VARIANT fields
    assert iso["attention"]["gqa4"]["stack"] == 2 and iso["ffn"]["no_op"]["stack"] == 0  # k = max_stack here
    assert predict(PARENT, iso)["total_s"] > 0
    # Estimates are not timed by any method.
    est = costs_for_workload(PARENT, SPACE, WL, CostsConfig(mode="estimate"))
    assert est["method"] is None


def test_parent_halves_are_the_most_common_non_no_op():
    blocks = [BlockConfig(A.gqa(4), F.no_op()), BlockConfig(A.gqa(4), F.swiglu(128)),
              BlockConfig(A.no_op(), F.swiglu(64)), BlockConfig(A.gqa(2), F.swiglu(64)),
              BlockConfig(A.no_op(), F.no_op())]
    assert parent_halves(PARENT.with_blocks(blocks)) == (A.gqa(4), F.swiglu(64))
    no_attention = PARENT.with_blocks([BlockConfig(A.no_op(), F.linear())] * 3)
    assert parent_halves(no_attention) == (A.no_op(), F.linear())


# A fake device: a layer costs its attention + its FFN + INTERACTION when both are present (they share a
# layer's launches and caches, say), plus BASE for the model around the layers. Prefill is 10x the decode step.
ATT_S = {"gqa4": 4.0, "gqa2": 2.0, "linear": 1.0, "no_op": 0.0}
FFN_S = {"swiglu128": 8.0, "swiglu64": 5.0, "linear": 1.5, "no_op": 0.0}
INTERACTION, BASE = 0.5, 100.0


def _fake_time_model(calls):
    def fake(config, w, ctx, cfg, device, gen):
        calls.append((config.vocab_size, config.blocks))
        step = BASE + sum(ATT_S[b.attention.name] + FFN_S[b.ffn.name]
                          + (INTERACTION if "no_op" not in (b.attention.name, b.ffn.name) else 0.0)
                          for b in config.blocks)
        return [10 * step], [step]
    return fake


def test_neighbourhood_costs_include_the_parents_other_half(tmp_path, monkeypatch):
    """With the parent's FFN around it, an attention variant costs its own time + the interaction; timed alone
    (isolated) it costs its own time only. Same for FFN variants around the parent's attention."""
    import puzzle.costs.measure

    blocks = [BlockConfig(a, f) for a in (A.gqa(4), A.gqa(2), A.linear(), A.no_op())
              for f in (F.swiglu(128), F.swiglu(64), F.linear(), F.no_op())]
    for method in ("neighbourhood", "isolated"):
        calls: list = []
        monkeypatch.setattr(puzzle.costs.measure, "_time_model", _fake_time_model(calls))
        cfg = CostsConfig(method=method, neighbours=3, max_stack=2, **CPU_MEASURE)
        data = costs_for_workload(PARENT, blocks, WL, cfg)
        extra = INTERACTION if method == "neighbourhood" else 0.0
        for part, own in (("attention", ATT_S), ("ffn", FFN_S)):
            for name, t in own.items():
                rec = data[part][name]
                expected = t + extra if name != "no_op" else 0.0
                assert rec["decode_step_s"] == pytest.approx(expected), (method, part, name)
                assert rec["prefill_s"] == pytest.approx(10 * expected), (method, part, name)
        assert data["method"] == method
        # Each reference stack is timed once: 3 x (no-op, swiglu128) and 3 x (gqa4, no-op), or one empty layer
        # (in the stacks' small vocabulary; the fixed costs are another empty layer, in the parent's).
        refs = ([(BlockConfig(A.no_op(), F.swiglu(128)),) * 3, (BlockConfig(A.gqa(4), F.no_op()),) * 3]
                if method == "neighbourhood" else [(BlockConfig(A.no_op(), F.no_op()),)])
        for ref in refs:
            assert calls.count((64, ref)) == 1, (method, ref)
        # 6 timed variants + references + the fixed costs (1 empty layer, the real vocabulary).
        assert len(calls) == 6 + len(refs) + 1


def test_a_reference_stack_that_does_not_fit_marks_its_part_oom(monkeypatch, capsys):
    import puzzle.costs.measure

    calls: list = []
    fake = _fake_time_model(calls)

    def oom_without_attention(config, *args):
        if config.blocks[0] == BlockConfig(A.no_op(), F.swiglu(128)) and len(config.blocks) > 1:
            raise torch.cuda.OutOfMemoryError("fake")
        return fake(config, *args)

    monkeypatch.setattr(puzzle.costs.measure, "_time_model", oom_without_attention)
    blocks = [BlockConfig(A.gqa(2), F.swiglu(64)), BlockConfig(A.no_op(), F.swiglu(128))]
    data = costs_for_workload(PARENT, blocks, WL, CostsConfig(neighbours=2, **CPU_MEASURE))
    assert data["attention"]["gqa2"]["oom"] and data["attention"]["gqa2"]["decode_step_s"] is None
    assert not data["attention"]["no_op"]["oom"] and data["attention"]["no_op"]["decode_step_s"] == 0.0
    assert data["ffn"]["swiglu64"]["decode_step_s"] == pytest.approx(FFN_S["swiglu64"] + INTERACTION)
    assert "attention reference stack" in capsys.readouterr().out


def test_unknown_method_is_a_clear_error(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("costs:\n  method: nearest\n")
    with pytest.raises(PuzzleError, match=r"costs.method: 'nearest' is not one of \['neighbourhood', 'isolated'\]"):
        load_config(CostsConfig, yaml_path, section="costs")
    with pytest.raises(PuzzleError, match="costs.method"):
        load_config(CostsConfig, None, ["method=neighborhood"], section="costs")
    assert load_config(CostsConfig, None, ["method=isolated", "neighbours=2"], section="costs").method == "isolated"
    # Built in code, past the YAML checks: refused before anything is timed.
    for bad, match in (({"method": "nearest"}, "costs.method 'nearest'"), ({"neighbours": 0}, "neighbours")):
        with pytest.raises(PuzzleError, match=match):
            run_costs(tmp_path, CostsConfig(mode="estimate", **bad), [WL], SPACE, model_config=PARENT)


# ---- damaged costs files and the uncalibrated fallback ---------------------------------------------------


@pytest.mark.parametrize("content", ["{\"schema\": \"puzzle-costs/1\", \"attention\": {", "[]", "{}",
                                     "{\"schema\": \"puzzle-costs/1\", \"workload\": {\"name\": \"small\"}}"])
def test_a_damaged_costs_file_is_an_error_naming_it(tmp_path, content):
    from puzzle.costs.table import measured_workloads

    run_costs(tmp_path, CostsConfig(mode="estimate"), [WL], SPACE, model_config=PARENT)
    bad = tmp_path / "costs" / "estimate-other.json"
    bad.write_text(content)
    fix = r"estimate-other.json is not a valid costs file .*; delete it and rerun `puzzle costs`"
    with pytest.raises(PuzzleError, match=fix):
        load_costs(tmp_path, "other", device="estimate")
    with pytest.raises(PuzzleError, match=fix):  # the search's workload discovery
        measured_workloads(tmp_path / "costs", "auto")
    assert "\n" not in str(pytest.raises(PuzzleError, load_costs, tmp_path, "other", "estimate").value)


def test_the_costs_stage_measures_a_damaged_file_again(tmp_path, capsys):
    cfg = CostsConfig(mode="estimate")
    path = run_costs(tmp_path, cfg, [WL], SPACE, model_config=PARENT)["small"]
    path.write_text("{\"schema\": ")
    run_costs(tmp_path, cfg, [WL], SPACE, model_config=PARENT)
    assert "measuring it again" in capsys.readouterr().out
    assert load_costs(tmp_path, "small", device="estimate")["attention"]["gqa4"]["decode_step_s"] > 0


def test_an_uncalibrated_fallback_is_a_kept_warning(tmp_path, monkeypatch):
    """When the whole parent cannot be timed (out of memory), the costs are kept uncalibrated and the run
    says so in warnings.json (shown by the summary), also when the stage runs again over the kept file."""
    import puzzle.costs.measure
    from puzzle.core.notices import read_warnings

    def timer(config, w, ctx, cfg, device, gen):
        if config.num_layers == PARENT.num_layers and config.vocab_size == PARENT.vocab_size:
            raise torch.cuda.OutOfMemoryError("fake")
        return [1.0 + config.num_layers], [0.1 + 0.01 * config.num_layers]

    monkeypatch.setattr(puzzle.costs.measure, "_time_model", timer)
    cfg = CostsConfig(mode="measure", device="cpu", dtype="float32", repeats=2, warmup=1,
                      input_sets=1, decode_inner=1, neighbours=2)
    path = run_costs(tmp_path, cfg, [WL], list(PARENT.blocks), model_config=PARENT)["small"]
    assert json.loads(path.read_text())["calibration"]["method"] == "none"
    for _ in range(2):  # the second run keeps the file and warns again (once)
        kept = read_warnings(tmp_path)
        assert [w["stage"] for w in kept] == ["costs"]
        assert "cpu-small.json: not calibrated against the whole parent" in kept[0]["message"]
        assert "does not fit in device memory" in kept[0]["message"]
        run_costs(tmp_path, cfg, [WL], list(PARENT.blocks), model_config=PARENT)


def test_the_search_side_of_costs_imports_without_torch():
    """Reading costs files and the MIP need no torch: `puzzle.costs.table` and the solver import without it."""
    import subprocess
    import sys

    code = ("import sys\nimport puzzle.costs.table, puzzle.costs.schema, puzzle.costs.calibration\n"
            "import puzzle.stages.search.mip\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('puzzle'))\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_default_roofline_is_the_h200_datasheet():
    """The estimate's default peaks are read from `runtime.datasheet`, not typed twice."""
    from puzzle.runtime.datasheet import datasheet, datasheet_named

    h200 = datasheet("NVIDIA H200")
    assert h200 is not None and datasheet_named("H200 SXM") is h200
    bf16, fp8 = CostsConfig(mode="estimate"), CostsConfig(mode="estimate", dtype="fp8")
    assert (bf16.peak_flops, bf16.mem_bandwidth) == (h200.peak("bfloat16"), h200.bandwidth)
    assert (fp8.peak_flops, fp8.mem_bandwidth) == (h200.peak("fp8"), h200.bandwidth)
    assert CostsConfig(mode="estimate", dtype="fp8", peak_flops=1e15).peak_flops == 1e15  # a set peak is kept
    with pytest.raises(KeyError, match="no datasheet named 'B300'"):
        datasheet_named("B300")
