"""`puzzle bench` on CPU with tiny models: runs, reports every metric, writes JSON; bad input is clear."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle.bench import (
    bench,
    decode_step_bytes,
    format_table,
    hf_generate_baseline,
    hf_llama_like,
    run_workload,
)
from puzzle.blocks import AttentionConfig as A
from puzzle.blocks import BlockConfig
from puzzle.blocks import FFNConfig as F
from puzzle.costs import CostsConfig, costs_for_workload
from puzzle.errors import PuzzleError
from puzzle.model import build_model
from puzzle.presets import tiny_llama_config
from puzzle.workloads import Workload

PARENT = tiny_llama_config(num_layers=2)
CHILD = PARENT.with_blocks([BlockConfig(A.gqa(1), F.swiglu(64)), BlockConfig(A.no_op(), F.linear())])
W = Workload("tiny", 2, 8, 6)


def test_bench_two_models_with_roofline_prediction_and_hf(tmp_path):
    models = {"parent": build_model(PARENT, seed=0).eval(), "child": build_model(CHILD, seed=1).eval()}
    costs = costs_for_workload(PARENT, list(PARENT.blocks) + list(CHILD.blocks), W, CostsConfig(mode="estimate"))
    hf = {"parent": hf_llama_like(PARENT, torch.device("cpu"), torch.float32)}
    report = bench(models, [W], repeats=1, hf_models=hf, costs={W.name: costs})
    parent, child = report["results"]
    assert report["reference"] == "parent" and parent["speedup_vs_reference"] == 1.0
    for r in (parent, child):
        assert r["output_tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["inter_token_s"] > 0
        assert r["total_tokens_per_s"] == pytest.approx(r["output_tokens_per_s"] * (8 + 6) / 6)
        assert r["roofline"]["ratio_to_floor"] > 0
        assert r["predicted"]["kind"] == "estimate"
    assert child["roofline"]["decode_step_bytes"] < parent["roofline"]["decode_step_bytes"]
    assert parent["hf_generate"]["output_tokens_per_s"] > 0 and "hf_generate" not in child
    table = format_table(report)
    assert "parent" in table and "child" in table and "ESTIMATE" in table
    out = tmp_path / "bench.json"
    out.write_text(json.dumps(report))
    assert json.loads(out.read_text())["results"][1]["model"] == "child"


def test_decode_step_bytes_counts_weights_and_kv():
    w = Workload("x", 4, 100, 28)
    base = decode_step_bytes(PARENT, w, 2, bucket=1)
    no_kv = decode_step_bytes(PARENT.with_blocks([BlockConfig(A.linear(), F.swiglu(128))] * 2), w, 2, bucket=1)
    assert base > no_kv  # GQA layers add their KV-cache reads


def test_hf_baseline_generates_exact_length():
    hf = hf_llama_like(PARENT, torch.device("cpu"), torch.float32)
    r = hf_generate_baseline(hf, W, PARENT.vocab_size, repeats=1)
    assert r["total_s"] > 0 and r["cache"] in ("static", "dynamic")


def test_bad_input():
    model = build_model(PARENT, seed=0)
    with pytest.raises(PuzzleError, match="context"):
        run_workload(model, Workload("long", 1, 200, 100))
    with pytest.raises(PuzzleError, match="at least one model"):
        bench({}, [W])
    with pytest.raises(PuzzleError, match="homogeneous"):
        hf_llama_like(CHILD, torch.device("cpu"), torch.float32)


def test_cli_unknown_model_path(capsys):
    from puzzle.cli import main

    assert main(["bench", "/nonexistent/model", "--workload", "batch1"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batch_too_large_names_largest_batch():
    model = build_model(PARENT, device="cuda", dtype=torch.bfloat16, seed=0)
    huge = Workload("huge", 10**7, 8, 8)
    with pytest.raises(PuzzleError, match="largest batch"):
        run_workload(model, huge)
