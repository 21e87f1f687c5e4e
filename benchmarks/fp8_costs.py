"""Costs at the deployment precision: does pricing FP8 (weights, activations, KV cache) change the searched child?

For the Llama-3.1-8B shape (random weights; synthetic per-layer scores) or a run directory's parent, library
and scores (`--run`), it
1. measures every variant's costs twice with `puzzle.costs` (`costs_for_workload`): `costs.dtype: bfloat16`
   and `costs.dtype: fp8` (FP8 linears via `torch._scaled_mm` and an FP8 KV cache, `puzzle.runtime.fp8`);
2. runs the search (`puzzle.stages.search.solve.search`) on each costs table with the same target (a
   throughput factor over that precision's own parent, and optionally a memory budget);
3. prints, per layer, where the two chosen children differ, and each child's predicted speed under both tables;
4. measures the FP8 child's KL to its own bf16 self on a few sequences: the full forward (FP8 linears) and the
   runtime's teacher-forced decode (FP8 linears + FP8 KV cache) against the bf16 runtime.
With random weights the KL is only a sanity check of the quantization (the logits of a random network are
near-uniform); `--run` gives real ones.

    python benchmarks/fp8_costs.py --out benchmarks/results/fp8_costs.json                  # 8B shape, one H200
    python benchmarks/fp8_costs.py --run runs/smollm2-135m-h200 --out benchmarks/results/fp8_costs_smollm2.json
    python benchmarks/fp8_costs.py --tiny --out /tmp/fp8_costs.json                         # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.core.artifacts import read_json, write_json
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import Workload
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.costs.table import cost_table_from_json
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig, ModelConfig
from puzzle.model.blocks import FFNConfig as Fc
from puzzle.model.decoder import PuzzleModel, build_model
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime.engine import Engine
from puzzle.runtime.fp8 import E4M3, kernel_for, quantize_fp8
from puzzle.runtime.timing import device_key
from puzzle.stages.search.solve import SearchInputs, objective_from_scores, search
from puzzle.stages.search.stage import SearchConfig
from puzzle.stages.search.targets import ConstraintSpec

PRECISIONS = ("bfloat16", "fp8")


def synthetic_space(parent: ModelConfig, seed: int = 0) -> tuple[list[list[BlockConfig]], list[np.ndarray]]:
    """Per layer: KV heads / 1, 2, 4, 8, linear, no-op x FFN width 4/4 .. 1/4, linear, no-op; a KL-like score that
    grows as a block loses parameters, with a per-layer sensitivity (the same for both precisions)."""
    rng = np.random.default_rng(seed)
    nkv, full = parent.blocks[0].attention.num_kv_heads, parent.blocks[0].ffn.intermediate_size
    atts = list(dict.fromkeys(A.gqa(max(1, nkv // d)) for d in (1, 2, 4, 8))) + [A.linear(), A.no_op()]
    ffns = list(dict.fromkeys(Fc.swiglu(full * f // 4) for f in (4, 3, 2, 1))) + [Fc.linear(), Fc.no_op()]
    blocks = [BlockConfig(a, f) for a in atts for f in ffns]
    p_att = parent.block_param_count(BlockConfig(atts[0], Fc.no_op()))
    p_ffn = parent.block_param_count(BlockConfig(A.no_op(), ffns[0]))
    objective = []
    for _ in range(parent.num_layers):
        s_att, s_ffn = rng.gamma(2.0, 0.5), rng.gamma(2.0, 0.5)
        kl = [s_att * (1 - min(1.0, parent.block_param_count(BlockConfig(b.attention, Fc.no_op())) / p_att)) ** 1.5
              + s_ffn * (1 - min(1.0, parent.block_param_count(BlockConfig(A.no_op(), b.ffn)) / p_ffn)) ** 1.5
              + 0.3 * s_att * (b.attention.kind == "linear") for b in blocks]
        objective.append(np.array(kl) * rng.uniform(0.9, 1.1, len(blocks)))
    return [list(blocks) for _ in range(parent.num_layers)], objective


def measure_costs(parent: ModelConfig, blocks: list[BlockConfig], w: Workload, precision: str, device: str,
                  args: argparse.Namespace) -> dict[str, Any]:
    cfg = CostsConfig(mode="measure", device=device, dtype=precision, repeats=args.repeats, warmup=2, input_sets=1,
                      decode_inner=args.decode_inner, graphs=args.graphs, consistency_remeasure=1)
    t0 = time.perf_counter()
    data = costs_for_workload(parent, blocks, w, cfg)
    data["measure_s"] = time.perf_counter() - t0
    return data


def chosen(inputs: SearchInputs, w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    constraints = [ConstraintSpec("throughput", f"{args.speedup}x", w.name)]
    if args.memory:
        constraints.append(ConstraintSpec("memory", args.memory, w.name))
    cfg = SearchConfig(constraints=constraints, baselines=False, verify_rounds=0)
    return search(inputs, cfg)["solutions"][0]


def kl_rows(ref: torch.Tensor, got: torch.Tensor) -> list[float]:
    """Mean KL(ref || got) per row of logits [N, T, V] (fp32, nats)."""
    lp, lq = F.log_softmax(ref.float(), -1), F.log_softmax(got.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(-1).tolist()


@torch.inference_mode()
def runtime_logits(model: PuzzleModel, ids: torch.Tensor, prompt: int, kv_dtype: torch.dtype | None,
                   graphs: str) -> torch.Tensor:
    """Logits [N, T - prompt, V] of a prefill of ids[:, :prompt] then teacher-forced decode of the rest."""
    n, t = ids.shape
    engine = Engine(model, n, t, graphs=graphs, kv_dtype=kv_dtype)
    out = [engine.prefill(ids[:, :prompt]).clone()]
    for i in range(prompt, t - 1):
        out.append(engine.decode(ids[:, i]).clone())
    return torch.stack(out, 1).cpu()


@torch.inference_mode()
def child_kl(make_child: Any, ids: torch.Tensor, graphs: str) -> dict[str, Any]:
    """The FP8 child against its bf16 self: full forward (FP8 linears) and runtime decode (+ FP8 KV cache)."""
    model = make_child()
    prompt = ids.shape[1] // 2
    ref_full = model(ids).logits.float().cpu()
    ref_run = runtime_logits(model, ids, prompt, None, graphs)
    quantize_fp8(model)
    full = kl_rows(ref_full, model(ids).logits.float().cpu())
    got_run = runtime_logits(model, ids, prompt, E4M3, graphs)
    run = kl_rows(ref_run, got_run)
    agree = float((ref_run.argmax(-1) == got_run.argmax(-1)).float().mean())
    del model
    return {"sequences": ids.shape[0], "tokens": ids.shape[1], "decoded_positions": ids.shape[1] - prompt,
            "kl_full_forward_fp8_linears": full, "kl_runtime_fp8_linears_and_kv": run,
            "runtime_top1_agreement": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="a run directory: its parent, library, scores and valid split")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke run)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--speedup", type=float, default=2.0, help="throughput target over each precision's parent")
    parser.add_argument("--memory", help="an optional memory budget for the child, e.g. 12GiB")
    parser.add_argument("--graphs", default="manual", help="runtime graph mode for the costs (auto = fused: compiles)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-inner", type=int, default=5)
    parser.add_argument("--kl-seqs", type=int, default=4)
    parser.add_argument("--kl-len", type=int, default=256)
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:  # seconds on a CPU
        args.batch, args.prompt, args.gen, args.kl_len, args.repeats, args.decode_inner = 2, 16, 8, 24, 2, 1
    w = Workload("fp8-bench", args.batch, args.prompt, args.gen)
    gen = torch.Generator().manual_seed(0)
    if args.run:
        from puzzle.formats import load_model_config
        from puzzle.formats.loading import load_model
        from puzzle.stages.data import load_tokens
        from puzzle.stages.library.store import Library
        from puzzle.stages.realize import build_child

        run = RunDir(args.run)
        parent = load_model_config(run.parent)
        scores = read_json(run.scores_file)
        candidates, objective = objective_from_scores(scores, "kl")
        tokens = load_tokens(run.data, "valid")
        ids = torch.from_numpy(np.array(tokens[:args.kl_seqs, :args.kl_len], dtype=np.int64))
        library = Library.open(run.library)

        def make_child(blocks: list[BlockConfig]) -> PuzzleModel:
            return build_child(load_model(run.parent, device=device, dtype=torch.bfloat16), library, blocks)
    else:
        parent = tiny_llama_config(num_layers=4, num_kv_heads=4) if args.tiny else llama31_8b_config()
        candidates, objective = synthetic_space(parent)
        ids = torch.randint(0, parent.vocab_size, (args.kl_seqs, args.kl_len), generator=gen)

        def make_child(blocks: list[BlockConfig]) -> PuzzleModel:
            return build_model(parent.with_blocks(blocks), device=device, dtype=torch.bfloat16, seed=0).eval()

    parent_blocks = list(parent.blocks)
    space = list(dict.fromkeys([b for layer in candidates for b in layer] + parent_blocks))
    record: dict[str, Any] = {"benchmark": "fp8_costs", **metadata(), "workload": w.to_dict(),
                              "parent": str(args.run) if args.run else ("tiny" if args.tiny else "llama-3.1-8b shape"),
                              "graphs": args.graphs, "speedup_target": args.speedup, "memory_target": args.memory,
                              "fp8_kernel": kernel_for(torch.device(device), parent.hidden_size, parent.hidden_size),
                              "costs": {}, "children": {}}
    print(f"FP8 product on {device}: {record['fp8_kernel']} (rowwise/tensor: torch._scaled_mm; dequant: fallback)")
    results = {}
    for precision in PRECISIONS:
        data = measure_costs(parent, space, w, precision, device, args)
        key = device_key(device)
        tables = {w.name: cost_table_from_json(data, candidates, Path(f"<{precision}>"), key, w.name)}
        parent_tables = {w.name: cost_table_from_json(data, [[b] for b in parent_blocks], Path(f"<{precision}>"),
                                                      key, w.name)}
        sol = chosen(SearchInputs(candidates, objective, parent_blocks, tables, parent_tables), w, args)
        choice = [layer.index(BlockConfig.from_dict(b)) for layer, b in zip(candidates, sol["blocks"])]
        results[precision] = {"data": data, "table": tables[w.name], "parent_table": parent_tables[w.name],
                              "choice": choice, "solution": sol}
        parent_pred = parent_tables[w.name].predict([0] * parent.num_layers)
        record["costs"][precision] = {
            "measure_s": data["measure_s"], "attention": data["attention"], "ffn": data["ffn"],
            "fixed": data["fixed"], "calibration": data["calibration"], "parent_predicted": parent_pred,
            "parent_memory": data["parent_memory"]}
        print(f"{precision}: costs measured in {data['measure_s']:.0f} s; parent predicted "
              f"{parent_pred['throughput_tok_s']:.0f} tok/s, {parent_pred['memory_bytes'] / 2**30:.1f} GiB")
    for precision in PRECISIONS:
        r = results[precision]
        cross = {}
        for other in PRECISIONS:  # this child priced under both tables
            pred = results[other]["table"].predict(r["choice"])
            base = results[other]["parent_table"].predict([0] * parent.num_layers)
            cross[other] = {"throughput_tok_s": pred["throughput_tok_s"], "memory_bytes": pred["memory_bytes"],
                            "speedup_over_parent": pred["throughput_tok_s"] / base["throughput_tok_s"]}
        record["children"][precision] = {"block_names": r["solution"]["block_names"],
                                         "objective": r["solution"]["objective"], "predicted": cross}
    names = {p: results[p]["solution"]["block_names"] for p in PRECISIONS}
    diff = [{"layer": i, "bfloat16": a, "fp8": b} for i, (a, b) in enumerate(zip(names["bfloat16"], names["fp8"]))
            if a != b]
    record["layers_differing"] = diff
    print(f"children chosen for {args.speedup}x over each precision's parent: {len(diff)} of "
          f"{parent.num_layers} layers differ")
    for d in diff:
        print(f"  layer {d['layer']:3d}: bf16 {d['bfloat16']:24s} fp8 {d['fp8']}")
    for p in PRECISIONS:
        c = record["children"][p]
        print(f"  {p} child: objective {c['objective']:.3f}; " + ", ".join(
            f"under {o} costs {v['throughput_tok_s']:.0f} tok/s ({v['speedup_over_parent']:.2f}x), "
            f"{v['memory_bytes'] / 2**30:.1f} GiB" for o, v in c["predicted"].items()))
    fp8_blocks = [BlockConfig.from_dict(b) for b in results["fp8"]["solution"]["blocks"]]
    ids = ids.to(device)
    record["fp8_child_kl"] = child_kl(lambda: make_child(fp8_blocks), ids, args.graphs)
    kl = record["fp8_child_kl"]
    print(f"FP8 child vs its bf16 self ({kl['sequences']} x {kl['tokens']} tokens): KL full forward "
          f"{np.mean(kl['kl_full_forward_fp8_linears']):.2e}, runtime decode (+ FP8 KV) "
          f"{np.mean(kl['kl_runtime_fp8_linears_and_kv']):.2e} nats/token, top-1 agreement "
          f"{kl['runtime_top1_agreement']:.3f}")
    write_json(args.out, json.loads(json.dumps(record, default=float)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
