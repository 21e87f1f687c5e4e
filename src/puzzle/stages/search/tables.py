"""What the search writes for people: solutions.csv (the Pareto table) and the wording of reachable values."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from puzzle.costs.source import prediction_label
from puzzle.stages.search.targets import parse_target

if TYPE_CHECKING:
    from puzzle.stages.search.solve import Target  # type only: solve imports this module


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def describe_best(target: Target, best_row_value: float) -> str:
    """'the fastest child reaches 1.80x ...; asked for 2.5x' from the extreme achievable row value."""
    s, t = target.spec, target.table
    wl = f" on {s.workload}" if s.workload else ""
    if s.kind == "throughput":
        tok_s = t.workload.output_tokens / (t.fixed_total_s + best_row_value)
        _, factor = parse_target(s.kind, s.target)
        got = f"{tok_s / target.parent_tok_s:.2f}x the parent's throughput ({tok_s:.4g} tok/s)" if factor \
            else f"{tok_s:.4g} tok/s"
        return f"the fastest child reaches {got}{wl}; asked for {s.target}"
    if s.kind in ("latency", "ttft"):
        fixed = t.fixed_total_s if s.kind == "latency" else t.fixed_prefill_s
        what = "total latency" if s.kind == "latency" else "time to first token"
        return f"the quickest child's {what}{wl} is {fixed + best_row_value:.4g} s; asked for <= {s.target}"
    if s.kind == "memory":
        per_gpu = f" per GPU of {t.workload.tensor_parallel}" if t.workload.tensor_parallel > 1 else ""
        return (f"the smallest child needs {_fmt_bytes(t.fixed_memory() + best_row_value)}{wl} "
                f"(weights + KV cache{per_gpu}); budget {s.target}")
    if s.kind == "params":
        return f"the smallest child has {_fmt_count(target.row_offset + best_row_value)} parameters; budget {s.target}"
    return f"at most {best_row_value:.0f} layers can keep attention; asked for {s.target}"


def pareto_csv(result: dict[str, Any]) -> str:
    """One row per MIP solution and baseline: target, score and every workload's predicted throughput (columns
    `<workload>_est_tok_s` / `_est_speedup` when the costs are an estimate, not a measurement)."""
    workloads = sorted(result["parent"])
    # a prediction from an analytic roofline is named so in its column: `<workload>_est_tok_s`
    tag = {x: prediction_label(result["parent"][x], "_est", "") for x in workloads}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "name", "target", "objective", *[f"{x}{tag[x]}_tok_s" for x in workloads],
                *[f"{x}{tag[x]}_speedup" for x in workloads], "params", "attention_layers", "pareto"])
    rows = [("mip", s) for s in result["solutions"]] + [(b["method"], b) for b in result["baselines"] if b["feasible"]]
    points = [(s["objective"], [s["predicted"][x]["throughput_tok_s"] for x in workloads]) for _, s in rows]

    def dominated(p: tuple[float, list[float]]) -> bool:  # another point scores no worse and is no slower
        return any(q != p and q[0] <= p[0] and all(a >= b for a, b in zip(q[1], p[1])) for q in points)

    for (method, s), point in zip(rows, points):
        pred = s["predicted"]
        params = next(iter(pred.values()))["params"] if pred else ""
        w.writerow([method, s.get("name", ""), s["target"], s["objective"],
                    *[pred[x]["throughput_tok_s"] for x in workloads], *[pred[x]["speedup"] for x in workloads],
                    params, s["attention_layers"], not dominated(point)])
    return buf.getvalue()
