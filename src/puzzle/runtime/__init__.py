"""Fast inference for heterogeneous children: static per-layer KV cache, batched prefill/decode, CUDA graphs."""

from puzzle.runtime.engine import Engine, left_pad, run_layers
from puzzle.runtime.generate import GenerationResult, generate
from puzzle.runtime.kv_cache import StaticKVCache
from puzzle.runtime.sampling import SamplingConfig, sample

__all__ = ["Engine", "GenerationResult", "SamplingConfig", "StaticKVCache", "generate", "left_pad",
           "run_layers", "sample"]
