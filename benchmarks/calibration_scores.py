"""Cost-model errors scored only on models the calibration was not fitted on, uncalibrated next to calibrated.

`puzzle costs` fits its calibration on the whole parent (one scale, or one offset, per phase), so the parent's
calibrated error is in-sample: it is kept apart ("fitted on") and never counted as evidence. No benchmark
fits anything across children, so leaving the parent out is the whole of leave-one-out here.

Run as a script, it re-scores the committed results from their raw numbers on a CPU (no GPU):
- `cost_model_ref_s*.json` and `runtime_throughput.json`: measured vs predicted tok/s per model under no
  calibration, "scale" and "offset";
- `cost_additivity*.json`: measured vs predicted decode step, raw and scaled to the parent;
- `reference_ref_s*/`: the searched children measured by `puzzle eval` against `predict` on the run's own
  costs files, calibrated as committed, uncalibrated, and with the width-consistent costs
  (`puzzle.costs.consistency`) recalibrated on the parent.

    python benchmarks/calibration_scores.py [--results benchmarks/results] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METHODS = ("none", "scale", "offset")
FITTED_ON = "parent"  # the model `puzzle costs` calibrates on


def held_out_errors(rows: list[dict[str, Any]], methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Per method: max and mean |rel_error_<method>| over rows whose model is not the parent (n), and the
    parent's own errors apart (in-sample for a calibrated method)."""
    held = [r for r in rows if r["model"] != FITTED_ON]
    out: dict[str, Any] = {}
    for m in methods:
        errs = [abs(r[f"rel_error_{m}"]) for r in held]
        out[m] = {"max_abs": max(errs) if errs else None, "mean_abs": statistics.mean(errs) if errs else None,
                  "n": len(errs),
                  "parent": {r.get("workload", ""): r[f"rel_error_{m}"] for r in rows if r["model"] == FITTED_ON}}
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _rows_table(title: str, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """One line per workload: children-only max (mean) |error| per method, the parent's apart."""
    lines, scores = [], {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        s = held_out_errors([r for r in rows if r["workload"] == workload])
        scores[workload] = s
        lines.append(f"| {title} | {workload} | {s['none']['n']} | "
                     + " | ".join(f"{_pct(s[m]['max_abs'])} ({_pct(s[m]['mean_abs'])})" for m in METHODS)
                     + " | " + " / ".join(_pct(next(iter(s[m]['parent'].values()), None)) for m in METHODS) + " |")
    return "\n".join(lines), scores


def cost_model_files(results: Path) -> tuple[str, dict[str, Any]]:
    header = ("| file | workload | children | uncalibrated max (mean) | scale max (mean) | offset max (mean) | "
              "parent none / scale / offset (fitted on, not evidence) |\n| --- | --- | --- | --- | --- | --- | --- |")
    parts, scores = [header], {}
    for name in ("cost_model_ref_s.json", "cost_model_ref_s_manual.json", "runtime_throughput.json"):
        path = results / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data.get("rows") or data.get("cost_model") or []
        text, scores[name] = _rows_table(f"`{name}`", rows)
        parts.append(text)
    return "\n".join(parts), scores


def additivity_files(results: Path) -> tuple[str, dict[str, Any]]:
    header = ("| file | method | children | raw max | scaled max | parent raw |\n"
              "| --- | --- | --- | --- | --- | --- |")
    parts, scores = [header], {}
    for path in sorted(results.glob("cost_additivity*.json")):
        data = json.loads(path.read_text())
        for method, p in (data.get("predictions") or {}).items():
            kids = {n: r for n, r in p["models"].items() if n != FITTED_ON}
            raw = max(abs(r["raw_err"]) for r in kids.values())
            scaled = max(abs(r["scaled_err"]) for r in kids.values())
            parent = p["models"].get(FITTED_ON, {}).get("raw_err")
            scores[f"{path.name}:{method}"] = {"children": len(kids), "max_abs_raw": raw, "max_abs_scaled": scaled,
                                               "parent_raw": parent}
            parts.append(f"| `{path.name}` | {method} | {len(kids)} | {_pct(raw)} | {_pct(scaled)} | {_pct(parent)} |")
    return "\n".join(parts), scores


def width_consistent(costs: dict[str, Any], parent: Any) -> dict[str, Any]:
    """The costs with the width-order fit applied and the calibration fitted again on the parent's measurement."""
    from puzzle.costs.calibration import fit_calibration
    from puzzle.costs.consistency import check, parent_anchors

    fitted, section = check(costs, parent_anchors(parent.blocks))
    cal = costs.get("calibration") or {}
    if "parent_measured" in cal:
        fitted["calibration"] = fit_calibration(parent, fitted, cal["method"], cal["parent_measured"])
    fitted["consistency"] = section
    return fitted


def reference_run(run: Path) -> tuple[str, dict[str, Any]]:
    """The reference run's children: measured (eval) vs predicted from its costs, three ways."""
    from puzzle.costs.table import predict
    from puzzle.model.blocks import BlockConfig

    evaluation = json.loads((run / "eval.json").read_text())["models"]
    solutions = json.loads((run / "solutions.json").read_text())["solutions"]
    header = ("| workload | model | measured tok/s | calibrated (as run) | uncalibrated | width-consistent, "
              "recalibrated |\n| --- | --- | --- | --- | --- | --- |")
    parts, scores = [header], {}
    for costs_path in sorted(run.glob("nvidia-h200-*.json")):
        costs = json.loads(costs_path.read_text())
        w = costs["workload"]["name"]
        parent_blocks = _parent_blocks(costs)
        parent = _config(costs, parent_blocks)
        uncalibrated = predict(parent_blocks, {**costs, "calibration": None})["decode_step_s"]
        if abs(uncalibrated / costs["calibration"]["parent_uncalibrated"]["decode_step_s"] - 1) > 1e-9:
            raise SystemExit(f"{costs_path}: the parent's blocks are not {parent_blocks[0].name} in every layer")
        variants = {"calibrated": costs, "uncalibrated": {**costs, "calibration": None},
                    "consistent": width_consistent(costs, parent)}
        models = {FITTED_ON: parent_blocks, **{s["name"]: [BlockConfig.from_dict(b) for b in s["blocks"]]
                                               for s in solutions}}
        for name, blocks in models.items():
            for suffix in ("", "/uptrained"):
                measured = evaluation.get(name + suffix, {}).get("throughput", {}).get(w, {})
                if "output_tokens_per_s" not in measured:
                    continue
                row = {"model": name + suffix, "workload": w, "measured_tok_s": measured["output_tokens_per_s"]}
                for key, c in variants.items():
                    row[f"rel_error_{key}"] = predict(blocks, c)["output_tokens_per_s"] / row["measured_tok_s"] - 1
                scores.setdefault(w, []).append(row)
                tag = " (fitted on)" if name == FITTED_ON else ""
                parts.append(f"| {w} | {name + suffix}{tag} | {row['measured_tok_s']:.0f} | "
                             + " | ".join(f"{100 * row[f'rel_error_{k}']:+.1f}%" for k in variants) + " |")
    summary = {w: held_out_errors([{**r, "model": r["model"].split("/")[0]} for r in rows],
                                  ("calibrated", "uncalibrated", "consistent")) for w, rows in scores.items()}
    return "\n".join(parts), {"rows": scores, "children": summary}


def _parent_blocks(costs: dict[str, Any]) -> list[Any]:
    """The parent's blocks: the widest attention and FFN of the costs in every layer (ref-s is uniform, and the
    search space is its own layers narrowed); checked against the parent's sum stored in the calibration."""
    from puzzle.costs.consistency import chains
    from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig

    names = chains(costs)
    att, ffn = names["attention"][-1], names["ffn"][-1]
    block = BlockConfig(AttentionConfig.gqa(int(att.removeprefix("gqa"))),
                        FFNConfig.swiglu(int(ffn.removeprefix("swiglu"))))
    return [block] * costs["model"]["num_layers"]


def _config(costs: dict[str, Any], blocks: list[Any]) -> Any:
    from puzzle.model.blocks import ModelConfig

    m = costs["model"]
    return ModelConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                       num_attention_heads=m["num_attention_heads"], head_dim=m["head_dim"], blocks=tuple(blocks))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--json", type=Path, default=None, help="also write the scores as JSON")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}
    text, out["cost_model"] = cost_model_files(args.results)
    print("Predicted vs measured output tok/s, children only (the calibration is fitted on the parent):\n")
    print(text)
    text, out["cost_additivity"] = additivity_files(args.results)
    print("\nPredicted vs measured decode step, children only:\n")
    print(text)
    for run in sorted(p.parent for p in args.results.glob("reference_ref_s*/eval.json")):
        text, out[run.name] = reference_run(run)
        print(f"\nReference run {run.name}, predicted - measured throughput:\n")
        print(text)
        for w, s in out[run.name]["children"].items():
            print(f"\n{w}: children max |error| " + ", ".join(f"{m} {_pct(v['max_abs'])}" for m, v in s.items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
