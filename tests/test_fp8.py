"""FP8 deployment precision: e4m3 linears, the FP8 KV cache, and `costs.dtype: fp8` pricing weights and KV at 1 byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from puzzle.core.dtypes import precision_bytes
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.source import costs_source
from puzzle.costs.stage import FP8_PEAK, CostsConfig, costs_for_workload, run_costs
from puzzle.costs.table import cost_table_from_json
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime import Engine, generate, left_pad
from puzzle.runtime.datasheet import datasheet
from puzzle.runtime.fp8 import E4M3, Fp8Linear, fp8_weight_bytes, has_fp8, quantize_fp8, quantize_rows

A, F = AttentionConfig, FFNConfig
CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach().float()).norm() / want.detach().float().norm())


def test_fp8_linear_is_close_and_its_scales_matter():
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 80)[:, None])  # rows 1000x apart: per-channel scales matter
    x = torch.randn(3, 7, 96) * torch.logspace(-1, 2, 7)[None, :, None]  # tokens 1000x apart: per-token scales
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == E4M3 and fp8.weight_scale.shape == (80,) and fp8.kernel == "dequant"
    want, got = linear(x), fp8(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert _rel(got, want) < 0.1
    # Per-row error too: a single shared scale would flush the small rows to zero.
    assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.1
    # The scales carry the magnitude: a layer that forgot them would be off by orders of magnitude.
    xq, _ = quantize_rows(x.reshape(-1, 96))
    unscaled = (xq.float() @ fp8.weight.float().t()).reshape(3, 7, 80)
    assert _rel(unscaled, want) > 10


@pytest.mark.parametrize("kernel", ["rowwise", "tensor"])
def test_scaled_mm_calls_match_the_dequantized_product(kernel):
    """The `torch._scaled_mm` calls themselves (scales [M, 1] and [1, N], or unit per-tensor scales), on the
    CPU where this torch has the op (torch 2.13 does), so their signature is checked without a GPU."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16) * torch.logspace(-1, 1, 5, dtype=torch.bfloat16)[None, :, None]
    slow = Fp8Linear.from_linear(linear)
    fast = Fp8Linear(slow.weight, slow.weight_scale, slow.bias, kernel=kernel)
    try:
        got = fast(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch {torch.__version__} has no CPU _scaled_mm ({kernel}): {str(e)[:80]}")
    assert _rel(got, slow(x)) < 1e-2 and _rel(got, linear(x)) < 0.1


def test_quantize_fp8_converts_layers_only_and_fuses_without_extra_memory():
    model = build_model(tiny_llama_config(num_layers=2), dtype=torch.bfloat16, seed=0).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    want = model(ids).logits
    linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
    weights, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    quantize_fp8(model, fuse=True)
    assert has_fp8(model) and not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.bfloat16
    op = model.layers[0].attention.op
    assert op.q_proj.weight.untyped_storage().data_ptr() == op.qkv_fp8.weight.untyped_storage().data_ptr()
    # 1 byte per weight + one fp32 scale per output row: the fused modules add nothing (the parts are views)
    assert fp8_weight_bytes(model) == weights + 4 * rows
    got = model(ids).logits
    assert _rel(got, want) < 0.1
    with pytest.raises(PuzzleError, match="already FP8"):
        quantize_fp8(model)


def test_fused_and_unfused_fp8_runtime_agree():
    prompts = [[5, 17, 99, 3, 250], [1, 2, 3]]
    outs = []
    for fuse in (False, True):
        model = quantize_fp8(build_model(tiny_llama_config(num_layers=3), seed=0).eval(), fuse=fuse)
        assert (getattr(model.layers[0].ffn.op, "gate_up_fp8", None) is not None) == fuse
        outs.append(generate(model, prompts, 8, graphs="none", engine=Engine(model, 2, 13, fuse=fuse)).tokens)
    assert outs[0] == outs[1]


def _step_logits(model, prompts, n, kv_dtype, tokens=None, graphs="none"):
    """Logits [n + 1, B, V] of a prefill and n decode steps fed `tokens` [n + 1, B] (None: greedy)."""
    engine = Engine(model, len(prompts), 24, graphs=graphs, bucket=8, kv_dtype=kv_dtype)
    ids, pads = left_pad(prompts)
    logits = [engine.prefill(ids, pads).clone()]
    for t in range(n):
        logits.append(engine.decode(logits[-1].argmax(-1) if tokens is None else tokens[t]).clone())
    return torch.stack(logits), engine


def test_fp8_kv_cache_decodes_like_the_full_precision_cache():
    model = build_model(tiny_llama_config(num_layers=4), seed=0).eval()
    prompts = [[5, 17, 99, 3, 250, 42, 7], [1, 2, 3]]  # the second is left-padded
    want, ref = _step_logits(model, prompts, 10, None)
    got, engine = _step_logits(model, prompts, 10, E4M3, tokens=want.argmax(-1))  # the same continuation
    cache = engine.cache
    assert cache.quantized and cache.layers[0].k.dtype == torch.uint8  # the e4m3 bits
    assert cache.nbytes() * 4 == ref.cache.nbytes()  # 1 byte per element vs float32
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9  # greedy picks: near-ties may flip
    assert _rel(got, want) < 0.1
    # The stored keys and values dequantize to the full-precision cache's (the scales were set by the prefill).
    n = engine.length
    for fp8_layer, full_layer in zip(cache.layers, ref.cache.layers):
        assert fp8_layer.k_scale.item() != 1.0
        for got_kv, want_kv in zip(fp8_layer.read(n), (full_layer.k[:, :, :n], full_layer.v[:, :, :n])):
            assert got_kv.dtype == torch.float32 and _rel(got_kv, want_kv) < 0.06
    cache.reset()
    assert not cache.layers[0].k.any()


def test_kv_cache_rejects_unknown_dtypes():
    with pytest.raises(PuzzleError, match="float8_e4m3fn"):
        Engine(build_model(tiny_llama_config(num_layers=1), seed=0), 1, 8, kv_dtype=torch.int8)


PARENT = tiny_llama_config(num_layers=2, num_kv_heads=4)
SPACE = [BlockConfig(a, f) for a in (A.gqa(4), A.gqa(2), A.no_op()) for f in (F.swiglu(128), F.no_op())]
WL = Workload("small", 2, 16, 8)


def test_fp8_estimate_prices_weights_and_kv_at_one_byte():
    bf16 = costs_for_workload(PARENT, SPACE, WL, CostsConfig(mode="estimate"))
    fp8 = costs_for_workload(PARENT, SPACE, WL, CostsConfig(mode="estimate", dtype="fp8"))
    assert fp8["dtype"] == "fp8" and fp8["roofline"]["peak_flops"] == FP8_PEAK
    for name in ("gqa4", "gqa2"):
        assert fp8["attention"][name]["kv_bytes_per_token"] * 2 == bf16["attention"][name]["kv_bytes_per_token"]
        assert fp8["attention"][name]["decode_step_s"] < bf16["attention"][name]["decode_step_s"]
    assert fp8["ffn"]["swiglu128"]["decode_step_s"] < bf16["ffn"]["swiglu128"]["decode_step_s"]
    assert fp8["parent_memory"]["kv_cache_bytes"] * 2 == bf16["parent_memory"]["kv_cache_bytes"]
    assert "H200 SXM: 1979 TFLOP/s fp8" in costs_source(fp8)
    # The search's table: block memory at 1 byte per weight, the bf16 embedding and head as fixed bytes.
    cands = [SPACE] * PARENT.num_layers
    t8, t16 = (cost_table_from_json(d, cands, "x.json", "estimate", "small") for d in (fp8, bf16))
    for a, b in zip(t8.memory_coeffs(), t16.memory_coeffs()):
        assert (a * 2 == b).all()
    for data, table in ((fp8, t8), (bf16, t16)):  # embedding + head at 2 bytes either way, + activations
        assert table.fixed_memory() == 2 * data["fixed"]["params"] + data["parent_memory"]["activation_bytes"]
    assert fp8["parent_memory"]["activation_bytes"] == bf16["parent_memory"]["activation_bytes"]
    layer_params = sum(PARENT.block_param_count(b) for b in PARENT.blocks)
    assert bf16["parent_memory"]["weights_bytes"] - fp8["parent_memory"]["weights_bytes"] == layer_params


def test_precision_names_and_their_errors(tmp_path):
    assert precision_bytes("fp8") == precision_bytes("float8_e4m3fn") == 1
    assert CostsConfig(dtype="float8_e4m3fn").dtype == "fp8" and CostsConfig(dtype="bf16").dtype == "bfloat16"
    assert CostsConfig(dtype="fp8", peak_flops=5e14).peak_flops == 5e14  # a given roofline is kept
    with pytest.raises(PuzzleError, match=r"^costs.dtype 'int4' is not supported; use one of .*fp8") as e:
        CostsConfig(dtype="int4")
    assert "\n" not in str(e.value)
    spec = datasheet("NVIDIA H200")
    assert spec.peak("fp8") == FP8_PEAK and datasheet("NVIDIA A100-SXM4-80GB").peak("fp8") is None
    path = run_costs(tmp_path, CostsConfig(mode="estimate", dtype="fp8"), [WL], SPACE, model_config=PARENT)["small"]
    assert json.loads(path.read_text())["dtype"] == "fp8"


def test_fp8_costs_measured_on_cpu_run_the_fp8_runtime():
    seen = []

    def timer(config, w, ctx, cfg, device, gen):
        from puzzle.costs.measure import _time_model
        seen.append(cfg.dtype)
        return _time_model(config, w, ctx, cfg, device, gen)

    cfg = CostsConfig(mode="measure", device="cpu", dtype="fp8", repeats=1, warmup=0, input_sets=1,
                      decode_inner=1, neighbours=1, calibrate="none", consistency_remeasure=0)
    data = costs_for_workload(PARENT, [BlockConfig(A.gqa(4), F.swiglu(128))], WL, cfg, timer=timer)
    assert data["kind"] == "measured" and data["dtype"] == "fp8" and set(seen) == {"fp8"}
    assert data["attention"]["gqa4"]["kv_bytes_per_token"] == 2 * 4 * PARENT.head_dim


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_scaled_mm_matches_the_dequantized_fallback():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(5, 3, 512, device="cuda", dtype=torch.bfloat16)
    fast = Fp8Linear.from_linear(linear)
    assert fast.kernel in ("rowwise", "tensor")
    slow = Fp8Linear(fast.weight, fast.weight_scale, fast.bias, kernel="dequant")
    want, got = slow(x), fast(x)
    assert _rel(got, want) < 1e-2  # the same quantized operands: only the summation order and rounding differ
    assert _rel(got, linear(x)) < 0.1
    # An odd shape falls back to the dequantized product instead of failing in cuBLASLt.
    assert Fp8Linear.from_linear(nn.Linear(100, 36, device="cuda", dtype=torch.bfloat16)).kernel == "dequant"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_fp8_child_with_cuda_graphs_matches_eager():
    model = quantize_fp8(build_model(tiny_llama_config(num_layers=3), device="cuda", dtype=torch.bfloat16,
                                     seed=0).eval())
    assert model.layers[0].attention.op.qkv_fp8.kernel in ("rowwise", "tensor")
    prompts = [[5, 17, 99, 3, 250], [1, 2, 3]]
    eager, _ = _step_logits(model, prompts, 12, E4M3)
    tokens = eager.argmax(-1)
    manual, _ = _step_logits(model, prompts, 12, E4M3, tokens, graphs="manual")  # the same kernels, replayed
    torch.testing.assert_close(manual, eager)
    # Compiled regions round differently before the activations are quantized, and a changed bf16 input can
    # move its e4m3 value by a step (6%): close, not equal.
    fused, _ = _step_logits(model, prompts, 12, E4M3, tokens, graphs="fused")
    assert _rel(fused, eager) < 0.05


def test_fp8_costs_benchmark_runs_at_its_tiny_shape(tmp_path):
    """benchmarks/fp8_costs.py end to end on CPU: both costs tables, both searches, the FP8 child's KL."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "fp8.json"
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "fp8_costs.py"), "--tiny", "--out", str(out)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    bf16, fp8 = result["costs"]["bfloat16"], result["costs"]["fp8"]
    assert fp8["attention"]["gqa4"]["kv_bytes_per_token"] * 2 == bf16["attention"]["gqa4"]["kv_bytes_per_token"]
    for child in result["children"].values():
        assert len(child["block_names"]) == 4 and set(child["predicted"]) == {"bfloat16", "fp8"}
    own = result["children"]["fp8"]["predicted"]["fp8"]["speedup_over_parent"]
    assert own >= 2.0 * (1 - 1e-6)  # the search met its target on its own table
    kl = result["fp8_child_kl"]
    assert all(0 <= v < 0.05 for v in kl["kl_full_forward_fp8_linears"] + kl["kl_runtime_fp8_linears_and_kv"])
    assert result["git_commit"] and "layers_differing" in result
