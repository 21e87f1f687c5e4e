"""search.serve_with: the MIP only sees the variants every named engine serves; the summary says which engines
serve each child; bad engine names and layers left with nothing are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from puzzle.core.artifacts import write_json
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.estimate import estimate_workload
from puzzle.costs.schema import SCHEMA
from puzzle.costs.stage import CostsConfig
from puzzle.formats import save_model
from puzzle.formats.engines import unservable_layers
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.memory import memory_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.report.serving import serving_lines
from puzzle.stages.search.stage import ConstraintSpec, SearchConfig, run_search

LAYERS = 4
PARENT = BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(512))
VARIANTS = [PARENT,
            BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(256)),  # every engine
            BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(512)),  # not vLLM / SGLang
            BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(200)),  # not what ffn_mult expresses
            BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())]
GEN = Workload("gen", 64, 128, 256)


def _write_run(run: Path):
    """Scores that make the unservable variants the cheapest in quality, and estimated costs."""
    model = tiny_llama_config(num_layers=LAYERS, hidden_size=256, num_heads=4, num_kv_heads=2,
                              intermediate_size=512, vocab_size=512)
    costs = estimate_workload(model, list(dict.fromkeys(b.attention for b in VARIANTS)),
                              list(dict.fromkeys(b.ffn for b in VARIANTS)), GEN,
                              CostsConfig(mode="estimate", peak_flops=1e12, mem_bandwidth=1e10), 192)
    write_json(run / "costs" / "estimate-gen.json", {
        "schema": SCHEMA, "kind": "estimate", "device": "estimate", "device_key": "estimate", "dtype": "bfloat16",
        "workload": GEN.to_dict(), **costs, "parent_memory": memory_model(model, GEN, 2)})
    kl = {0: 0.0, 1: 0.5, 2: 0.01, 3: 0.02, 4: 2.0}
    layers = [{"layer": i, "candidates": [{"block": b.to_dict(), "name": b.name, "kl": kl[j] * (1 + i),
                                           "lm_loss": 2 + kl[j], "lm_loss_delta": kl[j], "top1": 1 - kl[j] / 10,
                                           "top5": 1.0, "task_accuracy": None}
                                          for j, b in enumerate(VARIANTS)]} for i in range(LAYERS)]
    write_json(run / "scores" / "scores.json", {"parent": {"kl": 0.0}, "parent_blocks": [PARENT.to_dict()] * LAYERS,
                                                "layers": layers})
    return model


def _search(run: Path, serve_with: list[str]) -> list[dict]:
    cfg = SearchConfig(constraints=[ConstraintSpec("throughput", "1.3x", "gen")], serve_with=serve_with,
                       baselines=False, verify_rounds=0)
    return json.loads(run_search(run, cfg).read_text())["solutions"]


def test_serve_with_keeps_children_to_what_the_engines_serve(tmp_path: Path) -> None:
    model = _write_run(tmp_path)
    free = _search(tmp_path, [])[0]
    free_blocks = [BlockConfig.from_dict(b) for b in free["blocks"]]
    assert unservable_layers("vllm", model.with_blocks(free_blocks))  # unconstrained: the cheap linear attention
    for engines in (["vllm"], ["vllm", "llama.cpp"], ["trtllm"]):
        chosen = [BlockConfig.from_dict(b) for b in _search(tmp_path, engines)[0]["blocks"]]
        for engine in engines:
            assert not unservable_layers(engine, model.with_blocks(chosen)), (engines, chosen)
    trt = [BlockConfig.from_dict(b) for b in _search(tmp_path, ["trtllm"])[0]["blocks"]]
    assert any(b.attention.kind == "linear" for b in trt)  # TensorRT-LLM keeps linear attention on the table
    assert json.loads((tmp_path / "search" / "solutions.json").read_text())["config"]["serve_with"] == ["trtllm"]


def test_summary_lines_name_engines_per_child(tmp_path: Path) -> None:
    model = _write_run(tmp_path)
    save_model(build_model(model), tmp_path / "parent")
    _search(tmp_path, [])
    lines = serving_lines(tmp_path)
    assert lines[0].startswith("child-0 serves with: ") and "transformers" in lines[0]
    assert any(line.strip().startswith("vllm cannot serve it: layer") and "linear attention" in line
               for line in lines[1:])


def test_bad_serve_with_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PuzzleError, match=r"search.serve_with: unknown engine 'vlm'; use one of vllm, sglang"):
        SearchConfig(serve_with=["vlm"])
    run = tmp_path / "run"
    _write_run(run)
    scores = json.loads((run / "scores" / "scores.json").read_text())
    scores["layers"][2]["candidates"] = [c for c in scores["layers"][2]["candidates"]
                                         if c["block"]["attention"]["kind"] == "linear"]
    write_json(run / "scores" / "scores.json", scores)
    with pytest.raises(PuzzleError, match=r"no candidate of layer 2 can be served \(vllm: linear attention\)"):
        _search(run, ["vllm"])
