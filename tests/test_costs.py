"""Costs: analytic fallback, CPU measurement, memory model vs runtime allocation, device checks, predict."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.costs import CostsConfig, load_costs, predict, run_costs
from puzzle.errors import PuzzleError
from puzzle.memory import fits, max_batch_size, memory_model
from puzzle.model import build_model
from puzzle.presets import tiny_llama_config
from puzzle.runtime import Engine
from puzzle.workloads import Workload

A, F = AttentionConfig, FFNConfig
PARENT = tiny_llama_config(num_layers=3, num_kv_heads=4)
SPACE = [BlockConfig(a, f) for a in (A.gqa(4), A.gqa(2), A.gqa(1), A.linear(), A.no_op())
         for f in (F.swiglu(128), F.swiglu(64), F.linear(), F.no_op())]
WL = Workload("small", 2, 16, 8)


def test_analytic_costs_are_labelled_and_ordered(tmp_path):
    cfg = CostsConfig(workloads=[WL], mode="estimate")
    written = run_costs(tmp_path, cfg, SPACE, model_config=PARENT)
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
    run_costs(tmp_path, cfg, SPACE, model_config=PARENT)
    assert path.stat().st_mtime_ns == mtime


def test_measured_costs_on_cpu(tmp_path):
    cfg = CostsConfig(workloads=[WL], mode="measure", device="cpu", dtype="float32", repeats=2, warmup=1,
                      input_sets=1, decode_inner=1, max_stack=2)
    blocks = [BlockConfig(A.gqa(4), F.swiglu(128)), BlockConfig(A.no_op(), F.linear())]
    path = run_costs(tmp_path, cfg, blocks, model_config=PARENT)["small"]
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
    run_costs(tmp_path, CostsConfig(workloads=[WL], mode="estimate"), SPACE, model_config=PARENT)
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
    run_costs(tmp_path, CostsConfig(workloads=[WL], mode="estimate"), SPACE, model_config=PARENT)
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
        run_costs(tmp_path, CostsConfig(workloads=[WL], dtype="int8"), SPACE, model_config=PARENT)
    if not torch.cuda.is_available():
        with pytest.raises(PuzzleError, match="needs a CUDA GPU"):
            run_costs(tmp_path, CostsConfig(workloads=[WL], mode="measure"), SPACE, model_config=PARENT)
    with pytest.raises(PuzzleError, match="import"):
        run_costs(tmp_path, CostsConfig(workloads=[WL], mode="estimate"), SPACE)


def test_calibration_fits_the_whole_parent_and_search_agrees(tmp_path):
    """Measured costs carry the parent timed whole; calibrated predictions of the parent reproduce it, and the
    search's CostTable adds up exactly what `predict` does."""
    from puzzle.costs import block_costs
    from puzzle.search_costs import cost_table_from_json

    cfg = CostsConfig(workloads=[WL], mode="measure", device="cpu", dtype="float32", repeats=3, warmup=1,
                      input_sets=1, decode_inner=1, max_stack=2)
    child = PARENT.with_blocks([BlockConfig(A.gqa(2), F.swiglu(64)), BlockConfig(A.no_op(), F.linear()),
                                BlockConfig(A.gqa(4), F.no_op())])
    blocks = list(PARENT.blocks) + list(child.blocks)
    data = json.loads(run_costs(tmp_path, cfg, blocks, model_config=PARENT)["small"].read_text())
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
