"""Memory model: weights + KV cache (+ an activation estimate) of a model for a workload.

KV cache = batch x (prompt + generated) x sum over GQA layers of 2 * kv_heads * head_dim * dtype bytes,
exactly what `puzzle.runtime.StaticKVCache` allocates. Weights = every parameter. Activations are an upper
estimate of the prefill peak (the largest FFN's intermediates plus a few hidden-sized tensors per token,
and the fp32 last-token logits), so that "fits" keeps a margin.
"""

from __future__ import annotations

import statistics

from puzzle.core.workloads import Workload
from puzzle.model.blocks import ModelConfig


def weights_bytes(config: ModelConfig, dtype_bytes: int = 2, fixed_bytes: int | None = None) -> int:
    """fixed_bytes: per embedding, LM head and final-norm parameter, where they stay wider than the layers
    (an FP8 deployment keeps them bf16); None: dtype_bytes."""
    if fixed_bytes is None:
        return config.param_count() * dtype_bytes
    layers = sum(config.block_param_count(b) for b in config.blocks)
    return layers * dtype_bytes + config.fixed_param_count() * fixed_bytes


def kv_cache_bytes(config: ModelConfig, batch_size: int, seq_len: int, dtype_bytes: int = 2) -> int:
    return batch_size * seq_len * config.kv_cache_bytes_per_token(dtype_bytes)


def activation_bytes(config: ModelConfig, batch_size: int, prompt_len: int, dtype_bytes: int = 2) -> int:
    widest = max([b.ffn.intermediate_size or config.hidden_size for b in config.blocks if b.ffn.kind != "no_op"],
                 default=config.hidden_size)
    q_width = config.num_attention_heads * config.head_dim
    per_token = (3 * widest + 6 * config.hidden_size + 3 * q_width) * dtype_bytes
    logits = batch_size * config.vocab_size * 4 * 2  # fp32 logits + the sampler's copy
    return batch_size * prompt_len * per_token + logits


def memory_model(config: ModelConfig, workload: Workload, dtype_bytes: int = 2,
                 compute_bytes: int | None = None) -> dict[str, int]:
    """Bytes needed to serve `workload`: weights, KV cache, activation estimate and their total.

    dtype_bytes: per layer weight and cached K/V element; compute_bytes: per activation, embedding and LM-head
    weight when wider (FP8: 1 and 2); None: dtype_bytes.
    """
    w = weights_bytes(config, dtype_bytes, compute_bytes)
    kv = kv_cache_bytes(config, workload.batch_size, workload.max_seq_len, dtype_bytes)
    act = activation_bytes(config, workload.batch_size, workload.prompt_len, compute_bytes or dtype_bytes)
    return {"weights_bytes": w, "kv_cache_bytes": kv, "activation_bytes": act, "total_bytes": w + kv + act}


def max_batch_size(config: ModelConfig, prompt_len: int, gen_len: int, memory_bytes: int,
                   dtype_bytes: int = 2, compute_bytes: int | None = None) -> int:
    """The largest batch whose weights + KV cache + activations fit in `memory_bytes` (0 if none); the
    bytes as in `memory_model`."""
    free = memory_bytes - weights_bytes(config, dtype_bytes, compute_bytes)
    per_seq = (kv_cache_bytes(config, 1, prompt_len + gen_len, dtype_bytes)
               + activation_bytes(config, 1, prompt_len, compute_bytes or dtype_bytes))
    return max(0, free // per_seq) if per_seq > 0 else 0


def fits(config: ModelConfig, workload: Workload, memory_bytes: int, dtype_bytes: int = 2) -> bool:
    return memory_model(config, workload, dtype_bytes)["total_bytes"] <= memory_bytes


def mean_decode_context(workload: Workload, bucket: int) -> int:
    """Cache slots a decode step reads, averaged over the workload's decode steps (bucketed like the runtime)."""
    s = workload.max_seq_len
    lengths = [min(s, -(-(workload.prompt_len + i + 1) // bucket) * bucket) for i in range(workload.gen_len - 1)]
    return round(statistics.mean(lengths)) if lengths else workload.prompt_len + 1
