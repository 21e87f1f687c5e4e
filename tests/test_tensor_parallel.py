"""Tensor-parallel sharding over 2 gloo ranks (CPU) gives the unsharded model's logits on every rank:
the plain forward, and the runtime engine's prefill and KV-cached decode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from puzzle.core.config import from_dict
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import PuzzleModel, build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime.engine import Engine
from puzzle.runtime.tensor_parallel import shard_model, tensor_parallel_engine


def _heterogeneous(num_heads: int, kv: tuple[int, int], **kwargs: object) -> PuzzleModel:
    """Every attention kind (KV heads split and replicated) and every built-in FFN kind, 6 layers."""
    blocks = [
        BlockConfig(AttentionConfig.gqa(kv[0]), FFNConfig.swiglu(96)),
        BlockConfig(AttentionConfig.gqa(kv[1]), FFNConfig.linear()),
        BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(64)),
        BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
        BlockConfig(AttentionConfig.gqa(num_heads), FFNConfig.no_op()),
        BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(128)),
    ]
    config = tiny_llama_config(num_heads=num_heads, **kwargs).with_blocks(blocks)
    return build_model(config, seed=0)


def _models() -> list[PuzzleModel]:
    # 4 heads: KV 2 splits over 2 ranks, KV 1 is replicated; 6 heads with KV 3: uneven groups per rank
    # (rank 0 reads KV 0,0,1, rank 1 reads 1,2,2), with q/k/v biases and untied embeddings.
    return [_heterogeneous(4, (2, 1)), _heterogeneous(6, (3, 2), hidden_size=96, attention_bias=True,
                                                      tie_word_embeddings=False)]


def _check_engine(model: PuzzleModel, sharded: PuzzleModel, ids: torch.Tensor) -> None:
    """Padded prefill, then 3 decode steps on the static KV cache: same logits; each rank caches its KV heads.
    """
    full, tp = Engine(model, 2, 16, graphs="none"), tensor_parallel_engine(sharded, 2, 16)
    full_kv = [c.k.shape[1] for c in full.cache.layers if c is not None]
    tp_kv = [c.k.shape[1] for c in tp.cache.layers if c is not None]
    assert sum(tp_kv) < sum(full_kv), (tp_kv, full_kv)
    pads = torch.tensor([0, 3])
    want = full.prefill(ids[:, :6], pads).clone()  # [B, V]
    torch.testing.assert_close(tp.prefill(ids[:, :6], pads), want, atol=1e-5, rtol=1e-5)
    for step in range(3):
        tokens = ids[:, 6 + step]
        want = full.decode(tokens).clone()
        torch.testing.assert_close(tp.decode(tokens), want, atol=1e-5, rtol=1e-5)


def _worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        ids = torch.randint(0, 256, (2, 9))
        for model in _models():
            if model.lm_head is not None:
                with torch.no_grad():
                    model.lm_head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
            want = model(ids).logits  # [B, T, V]
            sharded = shard_model(model, rank, world)
            n_full = sum(p.numel() for layer in model.layers for p in layer.parameters())
            n_shard = sum(p.numel() for layer in sharded.layers for p in layer.parameters())
            assert n_shard < 0.75 * n_full, (n_shard, n_full)  # the layers really are split
            got = sharded(ids).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            _check_engine(model, sharded, ids)
    finally:
        dist.destroy_process_group()


def test_sharded_forward_matches_unsharded_on_every_rank(tmp_path: Path) -> None:
    os.environ.pop("TORCHELASTIC_RUN_ID", None)
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_world_size_not_dividing_query_heads_is_one_line_error() -> None:
    model = build_model(tiny_llama_config(num_heads=4, num_kv_heads=2), seed=0)
    with pytest.raises(PuzzleError, match=r"query heads \(4\) divisible by 3") as err:
        shard_model(model, 0, 3)
    assert "\n" not in str(err.value)


def test_engine_refuses_fused_graphs() -> None:
    model = build_model(tiny_llama_config(num_heads=4, num_kv_heads=2), seed=0)
    with pytest.raises(PuzzleError, match="graph mode 'fused' is not supported with tensor parallelism"):
        tensor_parallel_engine(shard_model(model, 0, 1), 1, 8, graphs="fused")  # type: ignore[arg-type]


def test_intermediate_not_divisible_names_the_layer() -> None:
    model = build_model(tiny_llama_config(num_heads=4, num_kv_heads=2, intermediate_size=130), seed=0)
    with pytest.raises(PuzzleError, match=r"layer 0: SwiGLU intermediate size 130"):
        shard_model(model, 0, 4)


def test_workload_tensor_parallel_is_optional_and_validated() -> None:
    plain = Workload("chat", 1, 128, 128)
    assert plain.tensor_parallel == 1
    assert plain.to_dict() == {"name": "chat", "batch_size": 1, "prompt_len": 128, "gen_len": 128}  # as before
    tp = from_dict(Workload, {**plain.to_dict(), "tensor_parallel": 2}, where="workloads[0]")
    assert tp.tensor_parallel == 2 and Workload(**tp.to_dict()) == tp
    with pytest.raises(PuzzleError, match="workload 'chat': tensor_parallel must be a positive integer, got 0"):
        Workload("chat", 1, 128, 128, tensor_parallel=0)


def test_one_shardability_check_for_the_runtime_and_the_costs_stage(tmp_path: Path) -> None:
    """shard_model and the costs stage refuse the same split by the same rule (`check_tensor_parallel`),
    each naming what it splits: a layer of the model, or a workload's variant."""
    from puzzle.costs.stage import CostsConfig, run_costs

    config = tiny_llama_config(num_heads=4, num_kv_heads=2, hidden_size=66, head_dim=16).with_blocks(
        [BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(64)), BlockConfig(AttentionConfig.linear(),
                                                                                FFNConfig.swiglu(64))])
    with pytest.raises(PuzzleError, match=r"over 4 ranks cannot split layer 1: a linear sub-block needs "
                                          r"hidden_size \(66\) divisible by 4; use a world size") as err:
        shard_model(build_model(config, seed=0), 0, 4)
    assert "\n" not in str(err.value)
    w = Workload("chat", 1, 8, 4, tensor_parallel=4)
    with pytest.raises(PuzzleError, match=r"workload 'chat': tensor_parallel=4 cannot split variant swiglu64: "
                                          r"a linear sub-block needs hidden_size \(66\) divisible by 4; "
                                          r"use a tensor_parallel degree") as err:
        run_costs(tmp_path, CostsConfig(mode="estimate"), [w], list(config.blocks), model_config=config)
    assert "\n" not in str(err.value)
    run_costs(tmp_path, CostsConfig(mode="estimate"), [Workload("chat", 1, 8, 4, tensor_parallel=2)],
              list(config.blocks), model_config=config)  # 2 divides everything: no refusal
