"""The inference runtime: exact against full recompute, batching, per-layer cache, sampling, bad input."""

from __future__ import annotations

import pytest
import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime import Engine, SamplingConfig, StaticKVCache, generate
from puzzle.runtime.sampling import filter_logits, sample

A, F = AttentionConfig, FFNConfig
# Every sub-block kind, with different KV-head counts per layer.
CHILD_BLOCKS = [
    BlockConfig(A.gqa(2), F.swiglu(128)),
    BlockConfig(A.gqa(1), F.swiglu(48)),
    BlockConfig(A.linear(), F.linear()),
    BlockConfig(A.no_op(), F.swiglu(64)),
    BlockConfig(A.gqa(4), F.no_op()),
    BlockConfig(A.no_op(), F.no_op()),
]


def child_model(seed: int = 0):
    config = tiny_llama_config(num_layers=len(CHILD_BLOCKS)).with_blocks(CHILD_BLOCKS)
    model = build_model(config, seed=seed)
    # Larger weights than Llama's 0.02 so that logits are far apart and greedy has no near-ties.
    model.init_weights(std=0.15, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@torch.no_grad()
def full_recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_runtime_matches_full_recompute_for_every_block_kind():
    model = child_model()
    prompt = [5, 17, 99, 3, 250, 42, 7]
    expected = full_recompute_greedy(model, prompt, 20)
    result = generate(model, [prompt], max_new_tokens=20)
    assert result.tokens[0] == expected
    assert result.finish_reasons == ["length"]


def test_engine_logits_match_model_forward():
    model = child_model(seed=1)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    full = model(ids).logits[0]  # [T, V]
    engine = Engine(model, batch_size=1, max_seq_len=10)
    first = engine.prefill(ids[:, :3]).clone()
    torch.testing.assert_close(first[0], full[2], rtol=1e-4, atol=1e-4)
    for t in range(3, 6):
        logits = engine.decode(ids[:, t])
        torch.testing.assert_close(logits[0], full[t], rtol=1e-4, atol=1e-4)


def test_batched_different_lengths_equals_unbatched():
    model = child_model(seed=2)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [200], [11, 12, 13, 14, 15]]
    batched = generate(model, prompts, max_new_tokens=12)
    for prompt, tokens in zip(prompts, batched.tokens):
        alone = generate(model, [prompt], max_new_tokens=12)
        assert tokens == alone.tokens[0]
        assert tokens == full_recompute_greedy(model, prompt, 12)


def test_kv_cache_allocates_only_for_gqa_layers():
    model = child_model()
    cache = StaticKVCache(model.config, batch_size=3, max_seq_len=16)
    kinds = [b.attention.kind for b in CHILD_BLOCKS]
    for kind, block, layer in zip(kinds, CHILD_BLOCKS, cache.layers):
        if kind == "gqa":
            assert layer is not None
            assert layer.k.shape == (3, block.attention.num_kv_heads, 16, model.config.head_dim)
        else:
            assert layer is None
    expected = sum(2 * 3 * b.attention.num_kv_heads * 16 * model.config.head_dim * 4
                   for b in CHILD_BLOCKS if b.attention.kind == "gqa")
    assert cache.nbytes() == expected == 16 * 3 * model.config.kv_cache_bytes_per_token(dtype_bytes=4)


def test_stop_tokens_end_rows_independently():
    model = child_model(seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = generate(model, prompts, max_new_tokens=10)
    stop = free.tokens[0][3]  # the 4th token of row 0
    streamed: list[tuple[int, list[int]]] = []
    result = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop],
                      on_token=lambda step, toks, done: streamed.append((step, toks)))
    assert result.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
    assert result.finish_reasons[0] == "stop"
    row1 = free.tokens[1]
    if stop in row1:
        assert result.tokens[1] == row1[:row1.index(stop)]
    else:
        assert result.tokens[1] == row1 and result.finish_reasons[1] == "length"
    assert [s for s, _ in streamed] == list(range(len(streamed)))
    assert [toks[0] for _, toks in streamed][:len(result.tokens[0])] == result.tokens[0]


def test_sampling_knobs():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    # probs of the top two ~0.64 + 0.24 = 0.88 < 0.9: the third token is needed, the rest are dropped.
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True, True]]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingConfig(temperature=1.0, top_k=2), gen) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    cold = torch.stack([sample(logits, SamplingConfig(temperature=1e-3), gen) for _ in range(20)])
    assert set(cold.flatten().tolist()) == {0}
    hot = torch.stack([sample(logits, SamplingConfig(temperature=100.0), gen) for _ in range(300)])
    assert len(set(hot.flatten().tolist())) == 5
    assert sample(logits, SamplingConfig()).tolist() == [0]


def test_seeded_sampling_is_reproducible():
    model = child_model(seed=4)
    cfg = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95)
    a = generate(model, [[1, 2, 3]], max_new_tokens=8, sampling=cfg, seed=123)
    b = generate(model, [[1, 2, 3]], max_new_tokens=8, sampling=cfg, seed=123)
    assert a.tokens == b.tokens


def test_bad_input():
    model = child_model()
    ctx = model.config.max_position_embeddings
    with pytest.raises(PuzzleError, match="exceeds the model's context"):
        generate(model, [[1] * (ctx - 2)], max_new_tokens=5)
    with pytest.raises(PuzzleError, match="empty"):
        generate(model, [[]], max_new_tokens=5)
    with pytest.raises(PuzzleError, match="outside the vocabulary"):
        generate(model, [[model.config.vocab_size]], max_new_tokens=5)
    with pytest.raises(PuzzleError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    engine = Engine(model, batch_size=1, max_seq_len=4)
    engine.prefill(torch.tensor([[1, 2, 3]]))
    engine.decode(torch.tensor([4]))
    with pytest.raises(PuzzleError, match="cache is full"):
        engine.decode(torch.tensor([5]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager():
    model = child_model().to("cuda")
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    eager = generate(model, prompts, max_new_tokens=16, graphs="none")
    graphed = generate(model, prompts, max_new_tokens=16, graphs="manual")
    assert graphed.tokens == eager.tokens


def _decode_logits(engine: Engine, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Prefill left-padded prompts, then greedy decode; every step's logits stacked [steps + 1, B, V]."""
    from puzzle.runtime import left_pad

    ids, pads = left_pad(prompts)
    out = [engine.prefill(ids, pads).clone()]
    for _ in range(steps):
        out.append(engine.decode(out[-1].argmax(-1)).clone())
    return torch.stack(out)


def test_fused_regions_equal_the_eager_step():
    """The "fused" decode step's decomposition (pending residual adds carried into the next region) is exact."""
    from puzzle.runtime.subblocks import FusedRegions

    model = child_model()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    eager = _decode_logits(Engine(model, 2, 16, graphs="none"), prompts, 6)
    engine = Engine(model, 2, 16, graphs="none")
    engine._regions = FusedRegions(backend=None)  # the regions as plain functions (CPU has no graphs)
    assert torch.equal(_decode_logits(engine, prompts, 6), eager)


def test_fused_regions_compile_once_per_sub_block_variant():
    """Layers of the same shape share one compiled region, and new cache lengths compile nothing."""
    from torch._dynamo.utils import counters

    from puzzle.runtime.subblocks import FusedRegions

    torch._dynamo.reset()
    config = tiny_llama_config(num_layers=4, num_kv_heads=2)
    model = build_model(config, seed=0).eval()
    engine = Engine(model, 1, 12, graphs="none")
    engine._regions = FusedRegions(backend="eager")  # dynamo tracing only: fast on CPU
    before = counters["stats"]["unique_graphs"]
    _decode_logits(engine, [[1, 2, 3]], 5)  # reads 4..8 cached slots: the region shapes never change
    assert counters["stats"]["unique_graphs"] - before == 4  # gqa q/k/v + cache write, o_proj, SwiGLU up to down, head


def test_compiled_regions_run_the_eager_decomposition_exactly():
    """Traced regions (dynamo's eager backend) start from zeros + the embedding, as compiled ones do: still exact."""
    from puzzle.runtime.subblocks import FusedRegions

    torch._dynamo.reset()
    model = child_model()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    eager = _decode_logits(Engine(model, 2, 16, graphs="none"), prompts, 4)
    engine = Engine(model, 2, 16, graphs="none")
    engine._regions = FusedRegions(backend="eager")
    assert torch.equal(_decode_logits(engine, prompts, 4), eager)


def test_decode_at_repeats_one_step_at_a_fixed_context():
    """`Engine.decode_at`: every call writes slot ctx - 1 and attends over [0, ctx), leaving length at ctx."""
    model = child_model()
    engine = Engine(model, 2, 16, graphs="none")
    engine.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    step = engine.decode_at(9, torch.tensor([7, 8]))
    assert bool(engine.valid.all())
    step()
    first = engine.logits.clone()
    step()
    assert engine.length == 9 and torch.equal(engine.logits, first)


def test_left_padding_is_one_tensor_shared_with_the_cache():
    """`Engine.pad` is the cache's `start`: a prefill sets both at once, the same object every step (what a
    captured graph reads), and `decode_at` clears both."""
    model = child_model()
    engine = Engine(model, 2, 16, graphs="none")
    pad = engine.pad
    assert pad is engine.cache.start
    engine.prefill(torch.tensor([[0, 0, 1], [4, 5, 6]]), torch.tensor([2, 0]))
    assert engine.pad is pad and pad.tolist() == [2, 0]
    engine.decode(torch.tensor([7, 8]))
    assert engine.pad is pad and engine.cache.start is pad and pad.tolist() == [2, 0]
    engine.decode_at(9, torch.tensor([7, 8]))
    assert engine.pad is pad and pad.tolist() == [0, 0]
    engine.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert engine.cache.start is pad and pad.tolist() == [0, 0]


def test_benchmark_only_graph_mode_is_a_one_line_error():
    with pytest.raises(PuzzleError, match="benchmarks/_graph_modes.py.*auto, fused, manual, none"):
        Engine(child_model(), 1, 8, graphs="compile")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_and_compile_modes_match_eager_on_gpu():
    model = child_model().to("cuda")
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    eager = _decode_logits(Engine(model, 2, 64, graphs="none"), prompts, 40)
    for mode in ("manual", "fused"):  # bucket 16: several captured graphs over the 40 steps
        got = _decode_logits(Engine(model, 2, 64, graphs=mode, bucket=16), prompts, 40)
        assert torch.allclose(got, eager, atol=2e-3, rtol=1e-3), mode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batch1_fused_decode_runs_the_gemv_kernels_like_eager_on_gpu():
    """At batch 1 the fused graphs run every GEMV as puzzle.runtime.gemv's Triton kernel, in bf16 as served.

    Both engines are fed the same tokens (eager's greedy ones), so bf16 rounding differences cannot make
    the two sequences diverge; every step's logits must agree to bf16 precision.
    """
    model = child_model().to("cuda", torch.bfloat16)
    eager, fused = Engine(model, 1, 64, graphs="none"), Engine(model, 1, 64, graphs="fused", bucket=16)
    assert fused._regions.gemv
    prompt = torch.tensor([[5, 17, 99, 3]])
    want, got = [eager.prefill(prompt).clone()], [fused.prefill(prompt).clone()]
    for _ in range(30):
        token = want[-1].argmax(-1)
        want.append(eager.decode(token).clone())
        got.append(fused.decode(token).clone())
    want, got = torch.stack(want), torch.stack(got)
    err = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()  # per step, relative to the logits
    assert err < 0.03, f"max relative logit error {err:.4f}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefill", ["eager", "compiled"])
def test_prefill_graph_replays_new_prompts_like_eager(prefill: str):
    """A captured prefill replays on new prompts of the same length (and captures anew for another length); a
    compiled prefill's regions compile in the capture's warm-up."""
    from puzzle.runtime import left_pad

    model = child_model().to("cuda")
    engine = Engine(model, 2, 32, graphs="fused", prefill=prefill)
    eager = Engine(model, 2, 32, graphs="none")
    for prompts in ([[1, 2, 3], [9, 8, 7, 6, 5]], [[4, 4, 4], [1, 3, 5, 7, 9]], [[2] * 9, [5] * 9]):
        ids, pads = left_pad(prompts)
        got = engine.prefill(ids, pads).clone()
        assert torch.allclose(got, eager.prefill(ids, pads), atol=2e-3, rtol=1e-3)
    assert len(engine._prefill_graphs) == 2  # (5 tokens, padded) and (9 tokens, not padded)
