"""MIP solve time for Puzzle-sized search spaces (CPU is fine).

80 layers x 64 candidates x 3 constraints (Llama-70B depth; target < 2 s) and 126 layers (Llama-405B depth).
Instances mimic real ones: per layer, candidates = attention variants x FFN variants, scores growing as a block
gets cheaper (with per-layer sensitivity and noise); constraints: throughput (time budget), memory (weights +
KV) and min attention layers; each at a tightness where it binds. Writes benchmarks/results/search_solve_time.json.

    python benchmarks/search_solve_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import scipy

from puzzle.core.artifacts import write_json
from puzzle.stages.search import mip


def instance(layers: int, n_att: int, n_ffn: int, seed: int) -> mip.Problem:
    rng = np.random.default_rng(seed)
    att_cost = np.linspace(1.0, 0.0, n_att)  # relative time of attention variants (parent first, no-op last)
    ffn_cost = np.linspace(1.0, 0.0, n_ffn)
    att_mem = np.linspace(1.0, 0.0, n_att) ** 1.5  # KV cache dominates attention memory
    ffn_mem = np.linspace(1.0, 0.0, n_ffn)
    has_att = np.array([1.0] * (n_att - 2) + [0.0, 0.0])  # the last two attention variants: linear, no-op
    objective, time_c, mem_c, attn_c = [], [], [], []
    for _ in range(layers):
        s_att, s_ffn = rng.gamma(2.0, 0.5), rng.gamma(2.0, 0.5)  # this layer's sensitivity
        kl = (s_att * (1 - att_cost)[:, None] ** 1.5 + s_ffn * (1 - ffn_cost)[None, :] ** 1.5)
        objective.append((kl * rng.uniform(0.8, 1.2, kl.shape)).ravel())
        time_c.append((0.4 * att_cost[:, None] + 0.6 * ffn_cost[None, :]).ravel() * rng.uniform(0.95, 1.05))
        mem_c.append((0.3 * att_mem[:, None] + 0.7 * ffn_mem[None, :]).ravel())
        attn_c.append(np.repeat(has_att, n_ffn))
    return mip.Problem(objective, [
        mip.Constraint("throughput", time_c, upper=0.5 * sum(t.max() for t in time_c)),  # ~2x the parent
        mip.Constraint("memory", mem_c, upper=0.55 * sum(m.max() for m in mem_c)),
        mip.Constraint("min_attention_layers", attn_c, lower=0.5 * layers),
    ])


def bench(layers: int, n_att: int, n_ffn: int, repeats: int) -> dict[str, object]:
    times, objectives, optimal = [], [], []
    for seed in range(repeats):
        problem = instance(layers, n_att, n_ffn, seed)
        t0 = time.perf_counter()
        sol = mip.solve(problem, time_limit_s=60.0)
        times.append(time.perf_counter() - t0)
        assert sol is not None and problem.feasible(sol.choice)
        objectives.append(sol.objective)
        optimal.append(sol.optimal)
    return {"layers": layers, "candidates_per_layer": n_att * n_ffn, "constraints": 3, "instances": repeats,
            "solve_s_median": statistics.median(times), "solve_s_max": max(times),
            "solve_s": times, "all_proven_optimal": all(optimal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_solve_time.json")
    args = parser.parse_args()
    results = [bench(80, 8, 8, args.repeats), bench(126, 8, 8, args.repeats)]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    record = {
        "benchmark": "search_solve_time",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "scipy": scipy.__version__},
        "command": "python benchmarks/search_solve_time.py --repeats " + str(args.repeats),
        "git_commit": commit,
        "mip_rel_gap": 0.0,
        "target": "80 layers x 64 candidates x 3 constraints under 2 s",
        "results": results,
        "target_met": results[0]["solve_s_max"] < 2.0,
    }
    write_json(args.out, record)
    for r in results:
        print(f"{r['layers']} layers x {r['candidates_per_layer']} candidates x 3 constraints: "
              f"median {r['solve_s_median']:.3f} s, max {r['solve_s_max']:.3f} s, optimal={r['all_proven_optimal']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
