"""Engine(prefill="compiled"): the prefill's sub-blocks as inductor regions give eager's logits and tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from puzzle.core.errors import PuzzleError
from puzzle.runtime import Engine, attention, left_pad
from puzzle.runtime.subblocks import _COMPILED, EAGER
from test_runtime import child_model

REPO = Path(__file__).resolve().parents[1]


def _prefill_then_greedy(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, list]:
    """Prefill logits [B, V] (unpadded when every prompt has the same length) and `steps` greedy tokens [B]."""
    ids, pads = left_pad(prompts)
    logits = engine.prefill(ids, pads if bool((pads > 0).any()) else None).clone()
    tokens, last = [], logits
    for _ in range(steps):
        tokens.append(last.argmax(-1).tolist())
        last = engine.decode(last.argmax(-1))
    return logits, tokens


UNPADDED = [[5, 17, 99, 3, 250, 42], [9, 8, 7, 6, 5, 4]]  # mask None: SDPA over the new keys (attend_new)
LEFT_PADDED = [[5, 17, 99, 3, 250, 42], [60, 2]]  # a mask: SDPA over the cache (attend_prefix)


@pytest.mark.parametrize(("prompts", "kv_dtype"), [(UNPADDED, None), (LEFT_PADDED, None),
                                                   (UNPADDED, torch.float8_e4m3fn)],
                         ids=["unpadded", "left_padded", "unpadded_fp8_cache"])
def test_compiled_prefill_equals_eager(prompts, kv_dtype) -> None:
    """Every sub-block kind (GQA of 1/2/4 KV heads, linear and no-op attention, SwiGLU of two widths, linear and
    no-op FFN) through inductor-compiled prefill regions: eager's logits, then the same greedy tokens.
    (One prompt length for every case: the o_proj, SwiGLU, linear and head regions compile once.) An FP8 cache
    sets its scales from the new keys and values inside the compiled region."""
    model = child_model()
    eager = Engine(model, 2, 24, graphs="none", kv_dtype=kv_dtype)
    compiled = Engine(model, 2, 24, graphs="none", kv_dtype=kv_dtype, prefill="compiled")
    assert eager._prefill_regions is EAGER
    assert compiled._prefill_regions.compiled and compiled.prefill_mode == "compiled"
    want_logits, want_tokens = _prefill_then_greedy(eager, prompts, 8)
    regions = compiled._prefill_regions
    padded = len({len(p) for p in prompts}) > 1
    name = "_qkv_write" if padded else "_qkv_rope_write"  # the masked path writes, then attends over the cache
    region = getattr(regions, name)
    assert region is _COMPILED[(getattr(attention, name[1:]), "inductor")]
    calls = []
    setattr(regions, name, lambda *a: calls.append(1) or region(*a))
    got_logits, got_tokens = _prefill_then_greedy(compiled, prompts, 8)
    assert len(calls) == 3  # the three GQA layers' q/k/v + RoPE + cache write ran through the inductor region
    tol = 1e-5 if kv_dtype is None else 1e-4  # e4m3 scales may differ in their last fp32 bit
    torch.testing.assert_close(got_logits, want_logits, atol=tol, rtol=tol)
    assert got_tokens == want_tokens
    # the cache the decode steps read was written by the compiled regions: the same keys and values
    for got, want in zip(compiled.cache.tensors(), eager.cache.tensors(), strict=True):
        if kv_dtype is None:
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        else:  # e4m3 codes: a value on a rounding boundary may land one code away
            diff = (got.int() - want.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_bad_prefill_mode_is_a_one_line_error() -> None:
    with pytest.raises(PuzzleError, match=r"unknown prefill mode 'fast'; use eager, compiled") as err:
        Engine(child_model(), 1, 8, prefill="fast")  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_prefill_peak_benchmark_records_both_modes(tmp_path) -> None:
    """benchmarks/prefill_peak.py --tiny: one row per prefill mode for the shape, each timed and profiled."""
    out = tmp_path / "prefill_peak.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prefill_peak.py"), "--tiny", "--shapes", "1x32",
                          "--profile", "1x32", "--repeats", "2", "--prefill", "eager,compiled", "--out", str(out)],
                         capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["prefill_modes"] == ["eager", "compiled"]
    rows = record["shapes"]["1x32"]["modes"]
    assert set(rows) == {"eager", "compiled"}
    for row in rows.values():
        assert row["prefill_s"] > 0 and row["tflops_per_s"] > 0 and row["profile"]["total_us"] > 0
    assert record["shapes"]["1x32"]["cublas_gemms_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_prefill_above_the_graph_limit_runs_uncaptured_on_gpu() -> None:
    """Above PREFILL_GRAPH_TOKENS a compiled prefill runs its regions directly, no graph (the captured replays
    below it: tests/test_runtime.py::test_prefill_graph_replays_new_prompts_like_eager[compiled])."""
    from puzzle.runtime.engine import PREFILL_GRAPH_TOKENS

    model = child_model().to("cuda")
    big = Engine(model, 1, PREFILL_GRAPH_TOKENS + 8, graphs="fused", prefill="compiled")
    ids = torch.randint(0, model.config.vocab_size, (1, PREFILL_GRAPH_TOKENS + 1))
    want = Engine(model, 1, PREFILL_GRAPH_TOKENS + 8, graphs="none").prefill(ids).clone()
    assert torch.allclose(big.prefill(ids), want, atol=2e-3, rtol=1e-3) and not big._prefill_graphs
