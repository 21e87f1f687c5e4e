"""Which serving engines can serve a child: the one table of what each engine's Nemotron-NAS / GGUF loader builds.

Each row was read from the engine's source (file and commit in `source`); the rules, not the code:
  vllm    model_executor/models/nemotron_nas.py: per layer `attention.no_op` or GQA with `n_heads_in_group`
          (per-layer KV heads); no `replace_with_linear` anywhere (a linear attention raises on
          `n_heads_in_group: null`, a linear FFN on `ffn_mult: null`); FFN size = DeciLM's rule on `ffn_mult` (a
          multiple of 256); o_proj gets a bias whenever `attention_bias` is set (our q/k/v-only bias cannot load);
          the KV-head count is read from the first attention layer (a child without one fails).
  sglang  srt/models/nemotron_nas.py: as vLLM (`ffn_mult` only, no linear); weights it does not know are logged
          and skipped, so a linear block would load as an untrained one.
  trtllm  _torch/models/modeling_nemotron_nas.py (PyTorch backend): no-op and linear for attention and FFN,
          per-layer KV heads, FFN size from `ffn_mult` only, no attention bias; reads `torch_dtype`.
  llama.cpp  src/models/deci.cpp + convert_hf_to_gguf.py DeciModel: per-layer head_count / head_count_kv /
          feed_forward_length (our GGUF export writes the sizes themselves, so any FFN size); no-op attention
          (0 heads) and linear attention (0 KV heads, `attn_output` = the linear map); no linear FFN; a layer whose
          FFN is absent skips the rest of the layer, dropping its attention output (and, in the last layer, the
          selection of output rows), so an FFN-free layer must have no attention and cannot be last.
  transformers  our bundled remote code (`remote_code/modeling_decilm.py`, transformers 5.0-5.24): everything.
FFN kinds registered beyond the built-in ones have no Nemotron-NAS mapping and no engine serves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from puzzle.core.errors import PuzzleError
from puzzle.formats.hf import is_homogeneous_llama
from puzzle.model.blocks import BlockConfig, ModelConfig

FFN_MULT_MULTIPLE = 256  # DeciLM's ffn_mult -> size rule rounds up to a multiple of this


@dataclass(frozen=True)
class EngineSpec:
    name: str
    source: str  # file and version the rules were read from
    attention: frozenset[str]  # attention kinds served: gqa (per-layer KV heads), linear, no_op
    ffn: frozenset[str]  # FFN kinds served: swiglu, linear, no_op
    ffn_mult_sizes: bool  # True: the SwiGLU size comes from ffn_mult, so it must be a multiple of 256
    qkv_bias: bool  # q/k/v bias without an o_proj bias (Qwen2-style parents)
    needs_gqa_layer: bool = False  # reads the KV-head count from the first attention layer
    ffn_free_layer_drops_attention: bool = False  # llama.cpp's deci graph


ENGINES: dict[str, EngineSpec] = {e.name: e for e in (
    EngineSpec("vllm", "vllm-project/vllm vllm/model_executor/models/nemotron_nas.py @00bd149",
               frozenset({"gqa", "no_op"}), frozenset({"swiglu", "no_op"}), ffn_mult_sizes=True, qkv_bias=False,
               needs_gqa_layer=True),
    EngineSpec("sglang", "sgl-project/sglang python/sglang/srt/models/nemotron_nas.py @15a024d",
               frozenset({"gqa", "no_op"}), frozenset({"swiglu", "no_op"}), ffn_mult_sizes=True, qkv_bias=False,
               needs_gqa_layer=True),
    EngineSpec("trtllm", "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_nemotron_nas.py @0193dbd",
               frozenset({"gqa", "linear", "no_op"}), frozenset({"swiglu", "linear", "no_op"}),
               ffn_mult_sizes=True, qkv_bias=False),
    EngineSpec("llama.cpp", "ggml-org/llama.cpp src/models/deci.cpp @75dc8f6, convert_hf_to_gguf.py DeciModel",
               frozenset({"gqa", "linear", "no_op"}), frozenset({"swiglu", "no_op"}), ffn_mult_sizes=False,
               qkv_bias=True, ffn_free_layer_drops_attention=True),
    EngineSpec("transformers", "puzzle remote_code/modeling_decilm.py (trust_remote_code, transformers 5.0-5.24)",
               frozenset({"gqa", "linear", "no_op"}), frozenset({"swiglu", "linear", "no_op"}),
               ffn_mult_sizes=False, qkv_bias=True),
)}


def check_engine_names(names: list[str], where: str = "search.serve_with") -> list[str]:
    """The names, checked against the table; one-line PuzzleError naming an unknown one."""
    if not isinstance(names, (list, tuple)):
        raise PuzzleError(f"{where} must be a list of engine names, e.g. [vllm]; got {names!r}")
    for name in names:
        if name not in ENGINES:
            raise PuzzleError(f"{where}: unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    return list(names)


def block_problem(engine: str, block: BlockConfig, layer: int, num_layers: int) -> str | None:
    """Why `engine` cannot serve this block at this layer ('linear attention', ...), or None when it can."""
    spec = ENGINES[engine]
    att, ffn = block.attention, block.ffn
    if att.kind not in spec.attention:
        return f"{att.kind} attention"
    if ffn.kind not in spec.ffn:
        return f"{ffn.kind} FFN"
    if spec.ffn_mult_sizes and ffn.kind == "swiglu" and ffn.intermediate_size % FFN_MULT_MULTIPLE:
        return f"FFN size {ffn.intermediate_size}: ffn_mult gives multiples of {FFN_MULT_MULTIPLE} only"
    if spec.ffn_free_layer_drops_attention and ffn.kind == "no_op":
        if att.kind != "no_op":
            return "attention without an FFN"
        if layer == num_layers - 1:
            return "FFN-free last layer"
    return None


def model_problem(engine: str, config: ModelConfig) -> str | None:
    """A whole-model reason `engine` cannot serve `config` (q/k/v bias, no attention layer), or None."""
    spec = ENGINES[engine]
    if config.attention_bias and not spec.qkv_bias:
        return "q/k/v bias"
    if spec.needs_gqa_layer and not any(b.attention.kind == "gqa" for b in config.blocks):
        return "no attention layer"
    return None


def unservable_layers(engine: str, config: ModelConfig) -> dict[int, str]:
    """Layer -> why `engine` cannot serve it (empty: every layer can be served)."""
    n = config.num_layers
    found = {i: block_problem(engine, b, i, n) for i, b in enumerate(config.blocks)}
    return {i: why for i, why in found.items() if why}


def servability(config: ModelConfig, engines: list[str] | None = None,
                homogeneous_as_llama: bool = True) -> dict[str, dict[str, Any]]:
    """engine -> {"ok": bool, "model": reason | None, "layers": {layer: reason}, "as": export format} for every
    engine of the table. A homogeneous GQA + SwiGLU model is served by all of them as a plain Llama/Qwen2 export."""
    out: dict[str, dict[str, Any]] = {}
    for name in list(ENGINES) if engines is None else engines:
        if homogeneous_as_llama and is_homogeneous_llama(config):
            out[name] = {"ok": True, "model": None, "layers": {}, "as": "llama"}
            continue
        layers, model = unservable_layers(name, config), model_problem(name, config)
        out[name] = {"ok": not layers and model is None, "model": model, "layers": layers,
                     "as": "gguf" if name == "llama.cpp" else "nemotron-nas"}
    return out


def describe_problem(engine: str, entry: dict[str, Any]) -> str:
    """'vllm cannot serve it: layers 3, 5 (linear attention); layer 7 (FFN size 1000 ...)' from a servability entry."""
    by_reason: dict[str, list[int]] = {}
    for layer, why in sorted(entry["layers"].items(), key=lambda kv: int(kv[0])):
        by_reason.setdefault(why, []).append(int(layer))
    parts = [f"{'layers' if len(ls) > 1 else 'layer'} {_ranges(ls)} ({why})" for why, ls in by_reason.items()]
    if entry.get("model"):
        parts.insert(0, str(entry["model"]))
    return f"{engine} cannot serve it: " + "; ".join(parts)


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out: list[str] = []
    for layer in layers:
        if out and layer == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{layer}"
        else:
            out.append(str(layer))
    return ", ".join(out)


def require_servable(config: ModelConfig, engines: list[str], fix: str, homogeneous_as_llama: bool = True) -> None:
    """PuzzleError naming the layers when one of `engines` cannot serve `config`; `fix` says what to do instead.
    homogeneous_as_llama=False: judge the Nemotron-NAS export even of a homogeneous model."""
    checked = check_engine_names(engines, "--engine")
    for name, entry in servability(config, checked, homogeneous_as_llama).items():
        if not entry["ok"]:
            raise PuzzleError(f"{describe_problem(name, entry)}; {fix}")


def servability_lines(config: ModelConfig) -> list[str]:
    """For `puzzle inspect` and the run summary: which engines serve it, then one line per engine that cannot."""
    table = servability(config)
    ok = [name for name, entry in table.items() if entry["ok"]]
    how = " (as a Llama export: puzzle export --format llama / gguf)" if is_homogeneous_llama(config) else ""
    lines = [f"serves with: {', '.join(ok) + how if ok else 'no engine of ' + ', '.join(ENGINES)}"]
    return lines + [describe_problem(name, entry) for name, entry in table.items() if not entry["ok"]]


def servability_json(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """servability() with the layer keys as JSON writes them (strings)."""
    return {name: {**entry, "layers": {str(k): v for k, v in entry["layers"].items()}}
            for name, entry in servability(config).items()}
