"""Throughput and latency of models on named workloads, side by side, with roofline and cost-model checks.

For each model and workload: prefill (time to first token), decode (inter-token latency), output and
total tokens/s, measured with the runtime (static cache, CUDA graphs on GPU). The first model is the
reference; the others get ratios to it. Optional: transformers' own `generate` as a baseline (static
cache where supported; a fall back to the dynamic cache is a warning), the decode step against its floors
(weights + KV-cache bytes / the measured copy bandwidth and / the datasheet bandwidth; FLOPs / the dtype's
datasheet peak, and which of memory and compute binds: `puzzle.runtime.datasheet`) and the throughput predicted
from per-block costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import PuzzleModel
from puzzle.model.memory import activation_bytes, kv_cache_bytes, max_batch_size, mean_decode_context
from puzzle.runtime.datasheet import DATASHEETS, DeviceSpec, datasheet
from puzzle.runtime.decode_attention import DecodeAttention
from puzzle.runtime.engine import Engine, GraphMode
from puzzle.runtime.timing import device_name, measure_bandwidth, sync

DEFAULT_BUCKET = 128


def check_fits(model: PuzzleModel, w: Workload) -> None:
    """Refuse a workload whose KV cache + activations exceed free device memory, naming the largest batch."""
    device = model.embed_tokens.weight.device
    if device.type != "cuda":
        return
    eb = model.embed_tokens.weight.element_size()
    cfg = model.config
    need = kv_cache_bytes(cfg, w.batch_size, w.max_seq_len, eb) + activation_bytes(cfg, w.batch_size, w.prompt_len, eb)
    free = torch.cuda.mem_get_info(device)[0]
    if need > free:
        weights = cfg.param_count() * eb
        largest = max_batch_size(cfg, w.prompt_len, w.gen_len, free + weights, eb)
        raise PuzzleError(
            f"workload {w.name!r} (batch {w.batch_size}, {w.prompt_len}+{w.gen_len} tokens) needs "
            f"{need / 2**30:.1f} GiB beyond the weights but {free / 2**30:.1f} GiB are free; the largest batch "
            f"that fits is {largest}"
        )


def oom_error(model: PuzzleModel, w: Workload) -> PuzzleError:
    device = model.embed_tokens.weight.device
    torch.cuda.empty_cache()
    eb = model.embed_tokens.weight.element_size()
    total = torch.cuda.get_device_properties(device).total_memory
    largest = max_batch_size(model.config, w.prompt_len, w.gen_len, total, eb)
    return PuzzleError(f"workload {w.name!r} ran out of device memory at batch {w.batch_size}; by the memory "
                       f"model the largest batch that fits is {largest}")


@torch.inference_mode()
def run_workload(model: PuzzleModel, w: Workload, graphs: GraphMode = "auto", repeats: int = 2,
                 seed: int = 0, bucket: int = DEFAULT_BUCKET, engine_cls: type[Engine] = Engine,
                 kv_dtype: torch.dtype | None = None, decode_attention: DecodeAttention = "auto") -> dict[str, Any]:
    """Greedy generation of w.gen_len tokens for w.batch_size random prompts; the last repeat's timings
    (the first one warms up and captures the CUDA graphs). engine_cls: an Engine subclass (the benchmarks'
    own graph modes, benchmarks/_graph_modes.py); kv_dtype: the KV cache's storage, decode_attention: its decode
    attention (both `Engine`)."""
    if w.max_seq_len > model.config.max_position_embeddings:
        raise PuzzleError(f"workload {w.name!r} needs {w.max_seq_len} tokens but the model's context is "
                          f"{model.config.max_position_embeddings}; pick a shorter workload")
    check_fits(model, w)
    device = model.embed_tokens.weight.device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (w.batch_size, w.prompt_len), generator=gen).to(device)
    try:
        extra: dict[str, Any] = {} if kv_dtype is None else {"kv_dtype": kv_dtype}
        if decode_attention != "auto":
            extra["decode_attention"] = decode_attention
        engine = engine_cls(model, w.batch_size, w.max_seq_len, graphs=graphs, bucket=bucket, **extra)
        runs = []
        for _ in range(max(1, repeats)):
            sync(device)
            t0 = time.perf_counter()
            tok = engine.prefill(ids).argmax(-1)
            sync(device)
            t1 = time.perf_counter()
            for _ in range(w.gen_len - 1):
                tok = engine.decode(tok).argmax(-1)
            sync(device)
            runs.append((t1 - t0, time.perf_counter() - t1))
    except torch.cuda.OutOfMemoryError:
        raise oom_error(model, w) from None
    ttft, decode = runs[-1] if len(runs) == 1 else min(runs[1:], key=lambda r: r[0] + r[1])
    total = ttft + decode
    return {
        "ttft_s": ttft, "decode_s": decode, "total_s": total,
        "inter_token_s": decode / max(1, w.gen_len - 1),
        "output_tokens_per_s": w.batch_size * w.gen_len / total,
        "total_tokens_per_s": w.batch_size * (w.prompt_len + w.gen_len) / total,
        "graphs": engine.graph_mode,
    }


def decode_step_bytes(config: ModelConfig, w: Workload, dtype_bytes: int, bucket: int = DEFAULT_BUCKET) -> int:
    """Bytes one decode step must read: every weight but the embedding table (B rows of it) + the KV cache."""
    weights = config.param_count() * dtype_bytes
    if not config.tie_word_embeddings:
        weights -= config.embedding_param_count() * dtype_bytes  # only B rows of the embedding are read
    ctx = mean_decode_context(w, bucket)
    return weights + w.batch_size * config.hidden_size * dtype_bytes + kv_cache_bytes(config, w.batch_size, ctx,
                                                                                       dtype_bytes)


def decode_step_flops(config: ModelConfig, w: Workload, bucket: int = DEFAULT_BUCKET) -> float:
    """FLOPs of one decode step: 2 per weight of every matrix product (blocks + LM head) per sequence, plus
    QK^T and PV over the mean cached context in every GQA layer."""
    ctx = mean_decode_context(w, bucket)
    matmul = sum(config.block_param_count(b) for b in config.blocks) + config.embedding_param_count()  # + LM head
    gqa = sum(b.attention.kind == "gqa" for b in config.blocks)
    return 2.0 * w.batch_size * matmul + 4.0 * w.batch_size * config.num_attention_heads * config.head_dim * ctx * gqa


def prefill_flops(config: ModelConfig, w: Workload) -> float:
    """FLOPs of one prefill: 2 per weight of every block's matrix products per prompt token, the LM head on the
    last position, and causal QK^T and PV (half the P x P square) in every GQA layer."""
    tokens = w.batch_size * w.prompt_len
    norms = sum(config.hidden_size * ((b.attention.kind != "no_op") + (b.ffn.kind != "no_op")) for b in config.blocks)
    blocks = sum(config.block_param_count(b) for b in config.blocks) - norms  # matrices only
    gqa = sum(b.attention.kind == "gqa" for b in config.blocks)
    attention = 2.0 * w.batch_size * config.num_attention_heads * config.head_dim * w.prompt_len ** 2 * gqa
    return 2.0 * tokens * blocks + 2.0 * w.batch_size * config.embedding_param_count() + attention  # + LM head


def roofline(config: ModelConfig, w: Workload, measured_step_s: float, bandwidth: float | None, dtype_bytes: int,
             bucket: int = DEFAULT_BUCKET, spec: DeviceSpec | None = None, dtype: str = "bfloat16",
             ttft_s: float | None = None) -> dict[str, Any]:
    """A decode step against its floors: the bytes it must read at the measured copy bandwidth (`floor_s`) and
    at the datasheet bandwidth, and its FLOPs at the dtype's datasheet peak; `binds` names the larger datasheet
    floor (None without a datasheet). With `ttft_s`, also the prefill's FLOP/s as a fraction of that peak (prefill
    is compute-bound at serving prompt lengths: its floor is FLOPs / peak)."""
    nbytes = decode_step_bytes(config, w, dtype_bytes, bucket)
    flops = decode_step_flops(config, w, bucket)
    out: dict[str, Any] = {"decode_step_bytes": nbytes, "decode_step_flops": flops, "measured_step_s": measured_step_s,
                           "bandwidth_bytes_per_s": bandwidth, "floor_s": None, "ratio_to_floor": None,
                           "datasheet_floor_s": None, "ratio_to_datasheet_floor": None, "compute_floor_s": None,
                           "ratio_to_compute_floor": None, "binds": None, "prefill_flops": prefill_flops(config, w),
                           "prefill_s": ttft_s, "prefill_fraction_of_peak": None}
    if bandwidth:
        out["floor_s"] = nbytes / bandwidth
        out["ratio_to_floor"] = measured_step_s / out["floor_s"]
    if spec is not None:
        out["datasheet_floor_s"] = nbytes / spec.bandwidth
        out["ratio_to_datasheet_floor"] = measured_step_s / out["datasheet_floor_s"]
        peak = spec.peak(dtype)
        if peak:
            out["compute_floor_s"] = flops / peak
            out["ratio_to_compute_floor"] = measured_step_s / out["compute_floor_s"]
            if ttft_s:
                out["prefill_fraction_of_peak"] = out["prefill_flops"] / ttft_s / peak
        out["binds"] = "compute" if (out["compute_floor_s"] or 0.0) > out["datasheet_floor_s"] else "memory"
    return out


# ---- transformers baseline ------------------------------------------------------------------------------


@torch.inference_mode()
def hf_generate_baseline(hf_model: Any, w: Workload, vocab_size: int, repeats: int = 2, seed: int = 0,
                         cache: str = "static") -> dict[str, Any]:
    """transformers' generate, greedy, exactly gen_len tokens.

    cache "static": its static cache (transformers then compiles the decode step itself), falling back to
    the dynamic cache where the model has none; "dynamic": the default cache most users run.
    """
    device = next(hf_model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (w.batch_size, w.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    cache_impl, fallback = cache, None

    def run(n: int) -> float:
        nonlocal cache_impl, fallback
        kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "attention_mask": mask,
                  "pad_token_id": 0}
        if cache_impl == "static":
            kwargs["cache_implementation"] = "static"
        sync(device)
        t0 = time.perf_counter()
        try:
            hf_model.generate(ids, **kwargs)
        except (ValueError, TypeError, NotImplementedError) as e:
            if cache_impl != "static":
                raise
            cache_impl = "dynamic"  # this model has no static cache support
            fallback = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            kwargs.pop("cache_implementation")
            sync(device)
            t0 = time.perf_counter()
            hf_model.generate(ids, **kwargs)
        sync(device)
        return time.perf_counter() - t0

    times = [run(w.gen_len) for _ in range(max(1, repeats))]
    ttft = min(run(1) for _ in range(max(1, repeats)))
    total = min(times[1:] if len(times) > 1 else times)
    return {"total_s": total, "ttft_s": ttft, "inter_token_s": (total - ttft) / max(1, w.gen_len - 1),
            "output_tokens_per_s": w.batch_size * w.gen_len / total,
            "total_tokens_per_s": w.batch_size * (w.prompt_len + w.gen_len) / total, "cache": cache_impl,
            "cache_requested": cache, "cache_fallback": fallback}


def hf_llama_like(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight transformers LlamaForCausalLM of a homogeneous config (speed needs no real weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: only the Llama baseline needs transformers

    b = config.blocks[0]
    if any(x != b for x in config.blocks) or b.attention.kind != "gqa" or b.ffn.kind != "swiglu":
        raise PuzzleError("a Llama baseline needs a homogeneous GQA + SwiGLU model; export the child with "
                          "`puzzle export` and bench the exported directory instead")
    hf_cfg = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=b.ffn.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=b.attention.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        **({"rope_scaling": config.rope_scaling} if config.rope_scaling else {}),  # None would warn (FutureWarning)
    )
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(dtype)
    return model.eval()


# ---- several models, one table ---------------------------------------------------------------------------


def bench(models: dict[str, PuzzleModel], workloads: list[Workload], graphs: GraphMode = "auto", repeats: int = 2,
          hf_models: dict[str, Any] | None = None,
          predict: Callable[[ModelConfig, Workload], dict[str, Any] | None] | None = None,
          measure_bw: bool = True, bandwidth: float | None = None,
          spec: DeviceSpec | None | str = "auto") -> dict[str, Any]:
    """Bench every model on every workload; the first model is the reference.

    hf_models: name -> transformers model for the baseline; predict: (model config, workload) -> the cost model's
    prediction (`puzzle.costs.table.predict` over a costs file; None: no prediction for that workload);
    bandwidth: the copy bandwidth (bytes/s; measured when None and measure_bw); spec: the device's datasheet
    ("auto": looked up by the device's name; None: none).
    """
    if not models:
        raise PuzzleError("bench needs at least one model")
    first = next(iter(models.values()))
    device = first.embed_tokens.weight.device
    dtype_bytes = first.embed_tokens.weight.element_size()
    dtype = str(first.embed_tokens.weight.dtype).removeprefix("torch.")
    if bandwidth is None and measure_bw:
        bandwidth = measure_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (64 << 20))
    if spec == "auto":
        spec = datasheet(device_name(device))
    results: list[dict[str, Any]] = []
    warnings: list[str] = []
    ref_name = next(iter(models))
    for w in workloads:
        ref = None
        for name, model in models.items():
            r: dict[str, Any] = {"model": name, "workload": w.to_dict(), **run_workload(model, w, graphs, repeats)}
            ref = ref or r
            r["speedup_vs_reference"] = r["output_tokens_per_s"] / ref["output_tokens_per_s"]
            if bandwidth or spec is not None:
                r["roofline"] = roofline(model.config, w, r["inter_token_s"], bandwidth, dtype_bytes, spec=spec,
                                         dtype=dtype, ttft_s=r["ttft_s"])
            if predict is not None and (p := predict(model.config, w)) is not None:
                p["measured_over_predicted"] = r["output_tokens_per_s"] / p["output_tokens_per_s"]
                p["same_graph_mode"] = p["graphs"] in (None, r["graphs"])  # like for like (None: estimate)
                r["predicted"] = p
            if hf_models and name in hf_models:
                try:
                    hf = hf_generate_baseline(hf_models[name], w, model.config.vocab_size, repeats)
                except Exception as e:  # noqa: BLE001 (transformers' own code: its failure costs the column only)
                    warnings.append(f"{name} on {w.name}: the HF baseline failed ({type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:200]}); no HF column for it")
                    results.append(r)
                    continue
                hf["runtime_speedup"] = r["output_tokens_per_s"] / hf["output_tokens_per_s"]
                r["hf_generate"] = hf
                if hf["cache_fallback"]:
                    warnings.append(f"{name} on {w.name}: the HF baseline ran with the dynamic cache, not the static "
                                    f"one asked for ({hf['cache_fallback']}); its tok/s is not like for like")
            results.append(r)
    sheet = None if spec is None else {"name": spec.name, "bandwidth_bytes_per_s": spec.bandwidth, "dtype": dtype,
                                       "peak_flops": spec.peak(dtype)}
    return {"device": device_name(device), "torch": torch.__version__, "reference": ref_name,
            "bandwidth_bytes_per_s": bandwidth, "datasheet": sheet, "results": results, "warnings": warnings}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def _percent(roof: dict[str, Any]) -> str:
    fraction = roof.get("prefill_fraction_of_peak")
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _binds(roof: dict[str, Any] | None) -> str:
    if not roof or roof["binds"] is None:
        return "?"
    return "memory" if roof["binds"] == "memory" else f"compute {_ratio(roof['ratio_to_compute_floor'])}x"


def floors_note(report: dict[str, Any]) -> str:
    """Where the floors' numbers come from, in one line."""
    bw, sheet = report.get("bandwidth_bytes_per_s"), report.get("datasheet")
    copy = f"copy = bytes read / {bw / 1e9:.4g} GB/s measured copy bandwidth" if bw else "copy: not measured"
    if sheet is None:
        return (f"floors (x = decode step / floor): {copy}; no datasheet for device {report['device']!r} (known: "
                f"{', '.join(spec.name for _, spec in DATASHEETS)}): no sheet or compute floor")
    peak = sheet["peak_flops"]
    compute = f"FLOPs / {peak / 1e12:.0f} TFLOP/s {sheet['dtype']} dense" if peak else f"no {sheet['dtype']} peak"
    return (f"floors (x = decode step / floor): {copy}; sheet = bytes read / {sheet['bandwidth_bytes_per_s'] / 1e9:.4g}"
            f" GB/s ({sheet['name']} datasheet); binds = the larger of the sheet floor and the compute floor ({compute}); "
            f"prefill %pk = prefill FLOPs / TTFT / that peak")


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'model':<18} {'workload':<16} {'out tok/s':>10} {'tot tok/s':>10} {'TTFT ms':>9} {'ITL ms':>8} "
            f"{'x ref':>6} {'x copy':>6} {'x sheet':>7} {'binds':>13} {'prefill %pk':>11} {'pred tok/s':>12} "
            f"{'HF tok/s':>9} {'x HF':>6}")
    lines = [f"device: {report['device']}, torch {report['torch']}, reference: {report['reference']}", head,
             "-" * len(head)]
    for r in report["results"]:
        pred = r.get("predicted")
        pred_s = "-" if pred is None else f"{pred['output_tokens_per_s']:.0f}" + ("~est" if pred["kind"] ==
                                                                                      "estimate" else "")
        hf = r.get("hf_generate")
        roof = r.get("roofline") or {}
        lines.append(
            f"{r['model'][:18]:<18} {r['workload']['name'][:16]:<16} {r['output_tokens_per_s']:>10.1f} "
            f"{r['total_tokens_per_s']:>10.1f} {r['ttft_s'] * 1e3:>9.2f} {r['inter_token_s'] * 1e3:>8.3f} "
            f"{r['speedup_vs_reference']:>6.2f} {_ratio(roof.get('ratio_to_floor')):>6} "
            f"{_ratio(roof.get('ratio_to_datasheet_floor')):>7} {_binds(roof):>13} {_percent(roof):>11} {pred_s:>12} "
            f"{(format(hf['output_tokens_per_s'], '.1f') if hf else '-'):>9} "
            f"{(format(hf['runtime_speedup'], '.2f') if hf else '-'):>6}"
        )
    lines.append(floors_note(report))
    if str(report["device"]).startswith("cpu"):
        lines.append("note: CPU timings vary up to ~20x between runs (other processes, frequency scaling); compare "
                     "models within one bench call, and time the target GPU for decisions")
    if any(r.get("predicted", {}).get("kind") == "estimate" for r in report["results"]):
        lines.append("~est: predicted from analytic (roofline) costs, an ESTIMATE, not a measurement")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
