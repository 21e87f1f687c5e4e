"""`puzzle bench` on CPU with tiny models: runs, reports every metric, writes JSON; bad input is clear."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.costs.table import predict
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime.bench import (
    bench,
    decode_step_bytes,
    format_table,
    hf_generate_baseline,
    hf_llama_like,
    prefill_flops,
    run_workload,
)

PARENT = tiny_llama_config(num_layers=2)
CHILD = PARENT.with_blocks([BlockConfig(A.gqa(1), F.swiglu(64)), BlockConfig(A.no_op(), F.linear())])
W = Workload("tiny", 2, 8, 6)


def test_bench_two_models_with_roofline_prediction_and_hf(tmp_path):
    models = {"parent": build_model(PARENT, seed=0).eval(), "child": build_model(CHILD, seed=1).eval()}
    costs = costs_for_workload(PARENT, list(PARENT.blocks) + list(CHILD.blocks), W, CostsConfig(mode="estimate"))
    hf = {"parent": hf_llama_like(PARENT, torch.device("cpu"), torch.float32)}
    report = bench(models, [W], repeats=1, hf_models=hf, predict=lambda config, w: predict(config, costs, w))
    parent, child = report["results"]
    assert report["reference"] == "parent" and parent["speedup_vs_reference"] == 1.0
    for r in (parent, child):
        assert r["output_tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["inter_token_s"] > 0
        assert r["total_tokens_per_s"] == pytest.approx(r["output_tokens_per_s"] * (8 + 6) / 6)
        assert r["roofline"]["ratio_to_floor"] > 0
        assert r["roofline"]["prefill_s"] == r["ttft_s"] and r["roofline"]["prefill_flops"] > 0
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


@pytest.mark.parametrize("config", [PARENT, CHILD], ids=["parent", "child"])
def test_prefill_flops_match_a_count_of_the_prefill(config):
    """The matrix products torch's FLOP counter sees in one prefill, plus causal attention (which SDPA on CPU
    does not report to the counter): 2 x B x Nq x D x P^2 per GQA layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from puzzle.runtime.engine import Engine

    w = Workload("p", 2, 12, 4)
    engine = Engine(build_model(config, seed=0).eval(), w.batch_size, 16, graphs="none")
    with FlopCounterMode(display=False) as counter:
        engine.prefill(torch.randint(0, config.vocab_size, (w.batch_size, w.prompt_len)))
    gqa = sum(b.attention.kind == "gqa" for b in config.blocks)
    attention = 2 * w.batch_size * config.num_attention_heads * config.head_dim * w.prompt_len ** 2 * gqa
    # matrix products only: a torch whose counter also reports SDPA (non-causal) must not double-count it
    products = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" not in str(op))
    assert products > 0 and prefill_flops(config, w) == products + attention


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


# ---- floors: copy bandwidth, datasheet bandwidth, compute ----------------------------------------------------


def test_datasheet_lookup_by_cuda_name():
    from puzzle.runtime.datasheet import datasheet

    assert datasheet("NVIDIA H200").bandwidth == 4.8e12
    assert datasheet("NVIDIA H100 80GB HBM3").name == "H100 SXM" and datasheet("NVIDIA H100 80GB HBM3").bandwidth == 3.35e12
    assert datasheet("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert datasheet("NVIDIA A100-SXM4-80GB").bandwidth == pytest.approx(2.039e12)
    assert datasheet("NVIDIA A100 80GB PCIe").bandwidth == pytest.approx(1.935e12)
    assert datasheet("NVIDIA H200").peak("torch.bfloat16") == 989e12
    assert datasheet("cpu") is None and datasheet("NVIDIA GeForce GT 710") is None


def test_decode_step_flops_by_hand():
    from puzzle.runtime.bench import decode_step_flops

    w = Workload("x", 4, 100, 28)  # bucket 1: mean context of the 27 decode steps = 100 + 14
    matmul = sum(PARENT.block_param_count(b) for b in PARENT.blocks) + PARENT.vocab_size * PARENT.hidden_size
    attention = 4 * 4 * PARENT.num_attention_heads * PARENT.head_dim * 114 * 2  # 2 GQA layers
    assert decode_step_flops(PARENT, w, bucket=1) == pytest.approx(2 * 4 * matmul + attention)


def test_floor_ratios_against_copy_and_datasheet_bandwidth_and_the_binding_floor():
    from puzzle.runtime.bench import decode_step_bytes, decode_step_flops
    from puzzle.runtime.datasheet import DeviceSpec

    models = {"parent": build_model(PARENT, seed=0).eval()}
    nbytes, flops = decode_step_bytes(PARENT, W, 4), decode_step_flops(PARENT, W)
    memory_bound = DeviceSpec("Sheet GPU", 2e7, {"float32": 1e18})
    report = bench(models, [W], repeats=1, bandwidth=1e7, spec=memory_bound)
    roof = report["results"][0]["roofline"]
    step = report["results"][0]["inter_token_s"]
    assert roof["ratio_to_floor"] == pytest.approx(step / (nbytes / 1e7))  # the copy bandwidth, as injected
    assert roof["ratio_to_datasheet_floor"] == pytest.approx(step / (nbytes / 2e7))
    assert roof["compute_floor_s"] == pytest.approx(flops / 1e18) and roof["binds"] == "memory"
    table = format_table(report)
    assert "x copy" in table and "x sheet" in table
    assert "/ 0.01 GB/s measured copy bandwidth" in table and "/ 0.02 GB/s (Sheet GPU datasheet)" in table
    assert f"{roof['ratio_to_datasheet_floor']:.2f}" in table and " memory " in table
    compute_bound = DeviceSpec("Slow GPU", 2e9, {"float32": 1.0})  # 1 FLOP/s: compute binds
    r = bench(models, [W], repeats=1, bandwidth=1e7, spec=compute_bound)["results"][0]
    roof = r["roofline"]
    assert roof["binds"] == "compute" and roof["ratio_to_compute_floor"] == pytest.approx(r["inter_token_s"] / flops)
    unknown = bench(models, [W], repeats=1, bandwidth=1e7)  # on the CPU: no datasheet
    assert unknown["datasheet"] is None and unknown["results"][0]["roofline"]["binds"] is None
    assert "no datasheet for device 'cpu'" in format_table(unknown)


# ---- the HF baseline: its cache fall-back is a warning; remote code only when trusted -----------------------


class _NoStaticCache:
    """A transformers model whose generate refuses the static cache, as models without support do."""

    def __init__(self, inner):
        self.inner = inner

    def parameters(self):
        return self.inner.parameters()

    def generate(self, ids, **kwargs):
        if kwargs.get("cache_implementation") == "static":
            raise ValueError("This model does not support `cache_implementation='static'`.\nmore detail")
        return self.inner.generate(ids, **kwargs)


def test_hf_static_to_dynamic_fallback_is_a_warning_in_the_table():
    hf = {"parent": _NoStaticCache(hf_llama_like(PARENT, torch.device("cpu"), torch.float32))}
    report = bench({"parent": build_model(PARENT, seed=0).eval()}, [W], repeats=1, hf_models=hf, measure_bw=False)
    r = report["results"][0]["hf_generate"]
    assert r["cache"] == "dynamic" and r["cache_requested"] == "static" and "does not support" in r["cache_fallback"]
    (warning,) = report["warnings"]
    assert "dynamic cache" in warning and "\n" not in warning
    assert f"warning: {warning}" in format_table(report).splitlines()


def test_hf_baseline_of_a_directory_with_remote_code_needs_the_flag(tmp_path, capsys):
    from puzzle.cli import main
    from puzzle.commands.bench import trusted_hf_dir
    from puzzle.formats import export_hf

    child = export_hf(build_model(CHILD, seed=1), tmp_path / "child")  # Nemotron-NAS: remote code (auto_map)
    assert main(["bench", str(child), "--workload", "batch1", "--hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--trust-remote-code" in err and "auto_map" in err and len(err.splitlines()) == 1
    assert trusted_hf_dir(child, trust_remote_code=True) is True
    plain = export_hf(build_model(PARENT, seed=0), tmp_path / "plain", format="llama")  # stock transformers code
    assert trusted_hf_dir(plain, trust_remote_code=False) is False


def test_bench_keeps_its_warnings_in_the_run_when_given_one(tmp_path, monkeypatch, capsys):
    import puzzle.runtime.bench
    from puzzle.cli import main
    from puzzle.core.artifacts import write_json
    from puzzle.core.notices import read_warnings
    from puzzle.core.workloads import workload_by_name
    from puzzle.formats import export_hf

    model = export_hf(build_model(PARENT, seed=0), tmp_path / "parent", format="llama")
    batch1 = workload_by_name("batch1")
    write_json(tmp_path / "run" / "costs" / "estimate-batch1.json",
               costs_for_workload(PARENT, list(PARENT.blocks), batch1, CostsConfig(mode="estimate")))
    message = "parent on batch1: the HF baseline ran with the dynamic cache"
    report = {"device": "cpu", "torch": torch.__version__, "reference": "parent", "bandwidth_bytes_per_s": None,
              "datasheet": None, "results": [], "warnings": [message]}
    monkeypatch.setattr(puzzle.runtime.bench, "bench", lambda *a, **k: report)
    assert main(["bench", str(model), "--workload", "batch1", "--costs", str(tmp_path / "run")]) == 0
    assert read_warnings(tmp_path / "run") == [{"stage": "bench", "message": message}]
    captured = capsys.readouterr()
    assert "warning (bench)" in captured.err and "warning:" not in captured.out  # printed once
