"""A tensor-parallel workload through the search: priced per GPU, constrained in memory per GPU, named with
its degree in the summary and the report, and not 'verified' by timing children on one GPU."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from puzzle.core.artifacts import write_json
from puzzle.core.workloads import Workload
from puzzle.costs.stage import CostsConfig, run_costs
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.report.stage import solutions_section
from puzzle.stages.report.summary import print_summary
from puzzle.stages.search.stage import ConstraintSpec, SearchConfig, load_inputs, run_search
from puzzle.stages.search.verify import _skip_reason

LAYERS = 3
PARENT = tiny_llama_config(num_layers=LAYERS, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512,
                           vocab_size=512)
VARIANTS = [PARENT.blocks[0], BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(256)),
            BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(256)),
            BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())]
ONE, TWO = Workload("gen", 8, 64, 64), Workload("gen-tp2", 8, 64, 64, tensor_parallel=2)


def _write_run(run_dir):
    run_costs(run_dir, CostsConfig(mode="estimate"), [ONE, TWO], VARIANTS, model_config=PARENT)
    rng = np.random.default_rng(0)
    layers = [{"layer": i, "candidates": [
        {"block": b.to_dict(), "name": b.name, "kl": 0.0 if j == 0 else float(rng.random() + j),
         "lm_loss": 2.0, "lm_loss_delta": 0.0, "top1": 1.0, "top5": 1.0, "task_accuracy": None}
        for j, b in enumerate(VARIANTS)]} for i in range(LAYERS)]
    write_json(run_dir / "scores" / "scores.json", {"parent": {"kl": 0.0, "lm_loss": 2.0},
                                                    "parent_blocks": [VARIANTS[0].to_dict()] * LAYERS,
                                                    "layers": layers})


def _parent_memory(run_dir, workload):
    inputs = load_inputs(run_dir, SearchConfig(constraints=[ConstraintSpec("throughput", "1x", workload)]))
    return inputs.parent_tables[workload].predict([0] * LAYERS)["memory_bytes"]


def test_a_tp2_workload_is_searched_per_gpu_and_named_with_its_degree(tmp_path, capsys):
    _write_run(tmp_path)
    whole, per_gpu = _parent_memory(tmp_path, "gen"), _parent_memory(tmp_path, "gen-tp2")
    assert per_gpu < 0.8 * whole  # layers split in two; embedding and LM head whole on each GPU
    budget = f"{int((whole + per_gpu) / 2)}B"  # the parent fits one GPU of two, not one GPU alone
    cfg = SearchConfig(constraints=[ConstraintSpec("memory", budget, "gen-tp2"),
                                    ConstraintSpec("throughput", "1x", "gen-tp2")])
    path = run_search(tmp_path, cfg, graphs="auto")
    result = json.loads(path.read_text())
    child = result["solutions"][0]
    assert child["layers_changed"] == 0  # per GPU the parent fits: nothing had to change
    assert child["predicted"]["gen-tp2"]["tensor_parallel"] == 2
    assert child["predicted"]["gen-tp2"]["memory_bytes"] <= (whole + per_gpu) / 2
    assert "tensor_parallel" not in child["predicted"]["gen"]
    assert result["verify"]["status"] == "skipped"  # an estimate: never timed here
    # the same budget on the one-GPU workload forces a smaller child
    cfg1 = SearchConfig(constraints=[ConstraintSpec("memory", budget, "gen")])
    (tmp_path / "search").rename(tmp_path / "search-tp2")
    one = json.loads(run_search(tmp_path, cfg1, graphs="auto").read_text())["solutions"][0]
    assert one["layers_changed"] > 0
    (tmp_path / "search").rename(tmp_path / "search-tp1")
    (tmp_path / "search-tp2").rename(tmp_path / "search")
    print_summary(tmp_path)
    assert "workload gen-tp2 (TP 2)" in capsys.readouterr().out
    section = solutions_section(result, {})
    assert "gen-tp2 (TP 2) ESTIMATED speedup" in section and "- gen-tp2 (TP 2): " in section


def test_the_measured_check_skips_a_tp_workload(tmp_path):
    _write_run(tmp_path)
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1x", "gen-tp2")])
    inputs = load_inputs(tmp_path, cfg)
    measured = replace(inputs, tables={w: replace(t, estimate=False) for w, t in inputs.tables.items()})
    assert _skip_reason(measured, cfg, ["gen-tp2"]) == ("gen-tp2 (TP 2) is tensor-parallel and the check times "
                                                        "children on one GPU")
    assert _skip_reason(measured, cfg, ["gen"]) is None
