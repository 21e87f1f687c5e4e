"""BLD throughput: parent tokens/s for a full decoupled library, against training one variant at a time.

    python benchmarks/bld_throughput.py --out benchmarks/results/bld_h200.json            # 1 GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/bld_throughput.py --out ...x2.json  # 2 GPUs
    python benchmarks/bld_throughput.py --tiny --out /tmp/bld_tiny.json                     # CPU, seconds

Models (random weights: the cost does not depend on their values):
  llama8b  Llama-3.1-8B shape; only `--layers-8b` layers (default 2) are built into the library, because a
           full decoupled library holds ~0.8B trainable parameters per layer (fp32 + AdamW = ~13 GB/layer).
           The parent is still whole; its forward runs up to the last selected layer.
  small16  16 layers of ref-s shape (hidden 256, 8 heads, 8 KV heads, SwiGLU 768, vocab 32000).
"fused" = every variant of every layer a rank owns trains off one parent forward per batch (what `puzzle
library` does); "one_at_a_time" = max_items_per_wave=1, the parent re-run for each variant.
parent tokens/s = training tokens each variant sees (steps x batch x seq_len) / wall time of the whole library.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.core.distributed import all_gather_objects, barrier, distributed
from puzzle.model.blocks import ModelConfig, uniform_blocks
from puzzle.model.decoder import build_model
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.stages.library import LibraryConfig, SearchSpaceConfig, build_library


def small16_config() -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=256, num_attention_heads=8, blocks=uniform_blocks(16, 8, 768),
                       tie_word_embeddings=True)


def measure(model: ModelConfig, layers: list[int], round_to: int, seq_len: int, batch: int, steps: int,
            one_at_a_time: bool, device: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if model.vocab_size > 65536 else np.uint16
    train = rng.integers(0, model.vocab_size, (max(batch * 4, 16), seq_len)).astype(dtype)
    valid = rng.integers(0, model.vocab_size, (batch, seq_len)).astype(dtype)
    cfg = LibraryConfig(search_space=SearchSpaceConfig(round_to=round_to, layers=layers),
                        tokens_per_variant=steps * batch * seq_len, batch_size=batch, init_batches=1,
                        valid_batches=1, max_items_per_wave=1 if one_at_a_time else 0, device=device)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")

    def load(d: torch.device, dt: torch.dtype) -> torch.nn.Module:  # random weights straight onto the device
        return build_model(model, device=d, dtype=dt, seed=seed)

    with tempfile.TemporaryDirectory() as tmp:
        # every rank needs the same directory: rank 0's temporary name is shared through the process group
        out = Path(all_gather_objects(tmp)[0]) / "library"
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        build_library(out, load, train, valid, cfg)
        wall = time.perf_counter() - start
        index = json.loads((out / "library.json").read_text()) if (out / "library.json").exists() else {}
        entries = index.get("entries", [])
        barrier()  # keep rank 0's directory until everyone is done
    trained = sum(1 for e in entries if e["metrics"]["tokens"] > 0)
    return {"mode": "one_at_a_time" if one_at_a_time else "fused", "layers": layers, "entries": len(entries),
            "trained_variants": trained, "steps": steps, "batch": batch, "seq_len": seq_len,
            "wall_s": round(wall, 3), "parent_tokens_per_s": round(steps * batch * seq_len / wall, 1),
            "variant_tokens_per_s": round(trained * steps * batch * seq_len / wall, 1),
            "peak_gib_rank0": (index.get("ranks") or [{}])[0].get("peak_memory_gib"), "ranks": index.get("ranks"),
            "val_nmse_after": val_nmse_by_entry(entries)}


def val_nmse_by_entry(entries: list[dict]) -> dict[str, float]:
    """library.json entries -> {layer/kind/attention/ffn: validation nMSE after BLD}, comparable across runs."""
    return {f"{e['layer']}/{e['kind']}/{json.dumps(e['attention'])}/{json.dumps(e['ffn'])}": e["metrics"]["val_nmse_after"]
            for e in entries}


def compare_entries(mine: dict[str, float], reference: dict[str, float]) -> dict:
    """How far this run's entries are from another world size's (validation NMSE after BLD)."""
    same = sorted(set(mine) & set(reference))
    diffs = [abs(mine[k] - reference[k]) for k in same]
    return {"same_entries": set(mine) == set(reference), "compared": len(same),
            "val_nmse_after_max_abs_diff": max(diffs, default=None),
            "val_nmse_after_max_rel_diff": max((d / max(abs(reference[k]), 1e-12) for d, k in zip(diffs, same)),
                                               default=None)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON results path")
    p.add_argument("--models", default="llama8b,small16", help="comma list of llama8b, small16")
    p.add_argument("--layers-8b", type=int, default=2, help="how many Llama-8B layers go into the library")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time baseline")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy on CPU, for testing the script")
    p.add_argument("--reference", type=Path, default=None,
                   help="another world size's results: compare entries and report the speed-up against it")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    with distributed(device) as info:
        if args.tiny:
            runs = {"tiny": (tiny_llama_config(num_layers=2), [0, 1], 16)}
            args.seq_len, args.batch, args.steps = 32, 4, 3
        else:
            runs = {}
            for name in args.models.split(","):
                if name == "llama8b":
                    runs[name] = (llama31_8b_config(), list(range(args.layers_8b)), 256)
                elif name == "small16":
                    runs[name] = (small16_config(), list(range(16)), 64)
                else:
                    p.error(f"unknown model {name!r}")
        results = []
        for name, (model, layers, round_to) in runs.items():
            # Warm-up (CUDA context, cuBLAS heuristics, allocator) so neither timed mode pays for it.
            measure(model, layers[:1], round_to, args.seq_len, args.batch, 1, False, device)
            row = {"model": name, "world_size": info.world_size}
            fused = measure(model, layers, round_to, args.seq_len, args.batch, args.steps, False, device)
            row["fused"] = fused
            if not args.no_baseline:
                base = measure(model, layers, round_to, args.seq_len, args.batch, args.steps, True, device)
                row["one_at_a_time"] = base
                row["speedup_vs_one_at_a_time"] = round(base["wall_s"] / fused["wall_s"], 3)
            if args.reference is not None:
                ref = {r["model"]: r for r in json.loads(args.reference.read_text())["results"]}.get(name)
                if ref is not None:
                    row["vs_reference"] = {**compare_entries(fused["val_nmse_after"], ref["fused"]["val_nmse_after"]),
                                           "reference_world_size": ref["world_size"],
                                           "speedup": round(ref["fused"]["wall_s"] / fused["wall_s"], 3)}
            results.append(row)
            if info.is_main:
                print(json.dumps(row), flush=True)
        if info.is_main:
            write_json(args.out, {"meta": metadata(), "benchmark": "bld_throughput",
                                  "world_size": info.world_size, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
