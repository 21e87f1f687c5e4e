"""Model shapes used by tests, benchmarks and the demo (weights are random or absent)."""

from __future__ import annotations

from puzzle.model.blocks import ModelConfig, uniform_blocks


def tiny_llama_config(num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: int = 128, vocab_size: int = 256, **kwargs: object) -> ModelConfig:
    """A few-layer Llama for CPU tests (seconds to build and run)."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=num_heads,
        blocks=uniform_blocks(num_layers, num_kv_heads, intermediate_size),
        max_position_embeddings=kwargs.pop("max_position_embeddings", 256), **kwargs,  # type: ignore[arg-type]
    )


LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama31_8b_config() -> ModelConfig:
    """Llama-3.1-8B's shape: 32 layers, hidden 4096, 32 query / 8 KV heads, SwiGLU 14336, vocab 128256."""
    return ModelConfig(
        vocab_size=128256, hidden_size=4096, num_attention_heads=32, blocks=uniform_blocks(32, 8, 14336),
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    )


def llama31_70b_config() -> ModelConfig:
    """Llama-3.1-70B's shape: 80 layers, hidden 8192, 64 query / 8 KV heads, SwiGLU 28672."""
    return ModelConfig(
        vocab_size=128256, hidden_size=8192, num_attention_heads=64, blocks=uniform_blocks(80, 8, 28672),
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    )
