"""What `search.serve_with` costs, predicted (CPU): re-run the search of a recorded reference run on its own scores
and measured H200 cost tables, unconstrained and restricted to each engine, and compare the chosen children's
predicted speed-up and summed KL. Measured speed-ups and quality of the restricted children need the GPU run
(benchmarks/reference_ref_s.sh with search.serve_with set).

    python benchmarks/serve_with_preview.py [--run benchmarks/results/reference_ref_s_after_redesign]

Writes benchmarks/results/serve_with_preview_<run>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.core.errors import PuzzleError
from puzzle.stages.library.search_space import parse_pair
from puzzle.stages.search.stage import ConstraintSpec, SearchConfig, load_inputs, search

ENGINE_SETS = ([], ["vllm"], ["trtllm"], ["llama.cpp"])


def scores_json(csv_path: Path) -> dict:
    """scores.json (the search's input) from a run's scores.csv."""
    rows = list(csv.DictReader(csv_path.open()))
    layers: dict[int, list] = {}
    for r in rows:
        if r["layer"] == "parent":
            continue
        entry = {"block": parse_pair(r["candidate"]).to_dict(), "name": r["candidate"]}
        for m in ("kl", "lm_loss", "lm_loss_delta", "top1", "top5", "task_accuracy"):
            entry[m] = float(r[m]) if r.get(m) else None
        layers.setdefault(int(r["layer"]), []).append(entry)
    # the parent's block: the variant every layer of the parent has (KL 0)
    parent = [min(c, key=lambda e: e["kl"])["block"] for _, c in sorted(layers.items())]
    return {"parent": {"kl": 0.0}, "parent_blocks": parent,
            "layers": [{"layer": i, "candidates": c} for i, c in sorted(layers.items())]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="benchmarks/results/reference_ref_s_after_redesign")
    args = ap.parse_args()
    src = Path(args.run)
    cfg_json = json.loads((src / "config.json").read_text())["search"]
    base = SearchConfig(constraints=[ConstraintSpec(**c) for c in cfg_json["constraints"]], sweep=cfg_json["sweep"],
                        sweep_constraint=cfg_json["sweep_constraint"], baselines=False, verify_rounds=0)
    workload = base.constraints[base.sweep_constraint].workload
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_json(run / "scores" / "scores.json", scores_json(src / "scores.csv"))
        (run / "costs").mkdir()
        for f in src.glob("nvidia-*.json"):
            shutil.copy(f, run / "costs" / f.name)
        for engines in ENGINE_SETS:
            cfg = replace(base, serve_with=list(engines))
            try:
                out = search(load_inputs(run, cfg), cfg)
            except PuzzleError as e:
                results.append({"serve_with": engines, "error": str(e)})
                continue
            for s in out["solutions"]:
                results.append({"serve_with": engines, "target": s["target"],
                                "predicted_speedup": s["predicted"][workload]["speedup"], "sum_kl": s["scores"]["kl"],
                                "blocks": s["block_names"]})
            for i in out["infeasible"]:
                results.append({"serve_with": engines, "target": i["target"], "infeasible": i["message"]})
    for r in results:
        label = ",".join(r["serve_with"]) or "(any)"
        if "predicted_speedup" in r:
            print(f"{label:>10} {r['target']:>5}: pred. {r['predicted_speedup']:.3f}x  sum KL {r['sum_kl']:.3f}")
        else:
            print(f"{label:>10} {r.get('target', '')}: {r.get('infeasible') or r.get('error')}")
    out_path = Path("benchmarks/results") / f"serve_with_preview_{src.name}.json"
    write_json(out_path, {"run": str(src), "workload": workload, "results": results, "meta": metadata()})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
