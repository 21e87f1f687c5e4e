"""What `puzzle inspect` reports: per-layer sub-blocks and parameters, and totals, from a meta-device model."""

from __future__ import annotations

from typing import Any

from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import build_model


def inspect_config(config: ModelConfig) -> dict[str, Any]:
    """Counts come from the modules the model would create (built on meta: no memory, no weights read)."""
    model = build_model(config, device="meta")
    layers = []
    for i, (block, layer) in enumerate(zip(config.blocks, model.layers)):
        att, ffn = block.attention, block.ffn
        layers.append({
            "index": i,
            "attention": att.kind, "kv_heads": att.num_kv_heads,
            "ffn": ffn.kind, "intermediate_size": ffn.intermediate_size,
            "params": sum(p.numel() for p in layer.parameters()),
        })
    params = sum(p.numel() for p in model.parameters())
    return {
        "layers": layers,
        "totals": {
            "params": params,
            "bytes_bf16": 2 * params,
            "kv_bytes_per_token_bf16": config.kv_cache_bytes_per_token(2),
            "num_layers": config.num_layers,
            "attention_layers": sum(b.attention.kind == "gqa" for b in config.blocks),
        },
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.4g}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000
    return str(n)


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or suffix == "TiB":
            return f"{n:.4g} {suffix}" if suffix != "B" else f"{n} B"
        n /= 1024
    return str(n)


def format_report(title: str, config: ModelConfig, report: dict[str, Any]) -> str:
    lines = [
        title,
        f"  hidden {config.hidden_size}, {config.num_attention_heads} query heads of dim {config.head_dim}, "
        f"vocab {config.vocab_size}, context {config.max_position_embeddings}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings, rope theta {config.rope_theta:g}"
        + (f" ({config.rope_scaling['rope_type']} scaling)" if config.rope_scaling else ""),
        "",
        f"  {'layer':>5}  {'attention':<10} {'kv heads':>8}  {'ffn':<8} {'size':>8}  {'params':>10}",
    ]
    for row in report["layers"]:
        lines.append(
            f"  {row['index']:>5}  {row['attention']:<10} {row['kv_heads'] or '-':>8}  {row['ffn']:<8} "
            f"{row['intermediate_size'] or '-':>8}  {_human(row['params']):>10}"
        )
    t = report["totals"]
    lines += [
        "",
        f"  total parameters   {t['params']:,} ({_human(t['params'])})",
        f"  weights in bf16    {_bytes(t['bytes_bf16'])}",
        (f"  KV cache per token {_bytes(t['kv_bytes_per_token_bf16'])} in bf16 "
         f"({t['attention_layers']} of {t['num_layers']} layers have attention with a cache)"),
    ]
    return "\n".join(lines)
