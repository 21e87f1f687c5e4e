"""The stage table of a `pipeline_8b.py` result, and its projection to Llama-3.1-70B on 8 GPUs.

Time, per stage, with r = P70 / P8 (parent parameters) and the same token budgets as measured:
    compute-bound on one GPU (score, costs, eval; they run on rank 0):   t70 = t8 * r
    BLD over 8 ranks (library):                                           t70 = t8 * r / (8 * e_bld)
    GKD over 8 ranks with FSDP (uptrain):                                 t70 = t8 * r / (8 * e_fsdp)
    I/O of the weights (import, realize):                                 t70 = t8 * r
    per layer (search: one MIP column per layer x variant):               t70 = t8 * L70 / L8
    independent of the model (data, report):                              t70 = t8
e_bld = t(1 GPU) / (2 * t(2 GPUs)) of BLD and e_fsdp = tokens/s(FSDP2, 2 GPUs) / (2 * tokens/s(1 GPU)) of GKD, both
measured on the Llama-8B shape over NCCL (benchmarks/results/distributed_h200x2/), assumed to hold at 8 ranks.

Memory per rank (bf16 weights = 2 bytes/param, GKD child in fp32 + AdamW = 16 bytes/param + 2 for autocast's
bf16 copy; Pc = child parameters, Pc70 = Pc8 * r; act = the measured peak minus the 8B static part, scaled by
hidden x layers):
    library: the whole parent on every rank + the measured wave memory    2 * P70 + (peak8 - 2 * P8)
    uptrain (FSDP, 8 shards):                                              (18 * Pc70 + 2 * P70) / 8 + act8 * s
    score / costs / eval (one GPU, whole model):                           2 * P70 + (peak8 - 2 * P8) * H70 / H8
    s = (H70 * L70) / (H8 * L8)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from puzzle.model.presets import llama31_70b_config

RESULTS = Path(__file__).resolve().parent / "results"
RANKS = 8
FSDP_EFFICIENCY = 0.9  # assumed where the measurement below is missing
H200_GIB = 139.8  # usable GPU memory of one H200
SCALING = {"import": "params", "data": "fixed", "library": "params/ranks (BLD)", "score": "params",
           "costs": "params", "search": "layers", "refine": "params/ranks (BLD)", "realize": "params",
           "uptrain": "params/ranks (FSDP)", "eval": "params", "report": "fixed"}
DISTRIBUTED = "distributed_h200x2"  # 1 vs 2 H200 over NCCL, Llama-8B shape (benchmarks/distributed_suite.sh)


def _llama8b_bld_wall_s(path: Path) -> float:
    return next(r["fused"]["wall_s"] for r in json.loads(path.read_text())["results"] if r["model"] == "llama8b")


def bld_efficiency(results: Path = RESULTS) -> tuple[float, str]:
    """Parallel efficiency of BLD on 2 GPUs vs 1 (Llama-8B rows): the NCCL suite's files, else the older
    bld_h200_{1,2}gpu.json, else 1.0."""
    for one, two in ((f"{DISTRIBUTED}/bld_8b_1gpu.json", f"{DISTRIBUTED}/bld_8b_2gpu.json"),
                     ("bld_h200_1gpu.json", "bld_h200_2gpu.json")):
        try:
            t1, t2 = _llama8b_bld_wall_s(results / one), _llama8b_bld_wall_s(results / two)
        except (OSError, StopIteration, KeyError, ValueError):
            continue
        return t1 / (2 * t2), f"t1/(2*t2) = {t1}/(2*{t2}) from benchmarks/results/{one} and {two}"
    return 1.0, "assumed 1.0 (no BLD 1- vs 2-GPU result found)"


def fsdp_efficiency(results: Path = RESULTS) -> tuple[float, str]:
    """Parallel efficiency of GKD with FSDP2 on 2 GPUs vs 1 GPU (same global batch, Llama-8B shape, 8 layers),
    else the assumed FSDP_EFFICIENCY."""
    one, two = f"{DISTRIBUTED}/gkd_8b_1gpu.json", f"{DISTRIBUTED}/gkd_8b_fsdp2.json"
    try:
        r1, r2 = (json.loads((results / f).read_text())["tokens_per_s"] for f in (one, two))
    except (OSError, KeyError, ValueError):
        return FSDP_EFFICIENCY, f"assumed {FSDP_EFFICIENCY} (benchmarks/results/{two} not found)"
    return r2 / (2 * r1), f"r2/(2*r1) = {r2}/(2*{r1}) tokens/s from benchmarks/results/{one} and {two}"


def project_70b(result: dict[str, Any]) -> dict[str, Any]:
    """Per-stage seconds and GiB per rank for the 70B shape on 8 GPUs, from a measured 8B-shape result."""
    big = llama31_70b_config()
    p8 = int(result["parent"]["params"])
    p70 = big.param_count()
    h8, l8 = int(result["parent"]["hidden_size"]), int(result["parent"]["num_hidden_layers"])
    h70, l70 = big.hidden_size, big.num_layers
    r = p70 / p8
    e_bld, e_bld_source = bld_efficiency()
    e_fsdp, e_fsdp_source = fsdp_efficiency()
    pc8 = result.get("child_params") or p8
    pc70 = pc8 * r
    s_act = (h70 * l70) / (h8 * l8)
    factors = {"params": r, "params/ranks (BLD)": r / (RANKS * e_bld),
               "params/ranks (FSDP)": r / (RANKS * e_fsdp), "layers": l70 / l8, "fixed": 1.0}
    rows = []
    for row in result["stages"]:
        stage, rule = row["stage"], SCALING[row["stage"]]
        if "wall_s" not in row:  # a stage that failed: nothing to project
            rows.append({"stage": stage, "rule": rule, "error": row.get("error", "not finished")})
            continue
        out: dict[str, Any] = {"stage": stage, "rule": rule, "factor": round(factors[rule], 4),
                               "wall_s": round(row["wall_s"] * factors[rule], 1)}
        if row.get("tokens_per_s"):
            out["tokens_per_s"] = round(row["tokens_per_s"] / factors[rule], 1)
        peak = row.get("peak_allocated_gib")
        if peak is not None:
            static8 = 2 * p8 / 2**30
            if stage == "library":
                mem = 2 * p70 / 2**30 + max(peak - static8, 0.0)
            elif stage == "uptrain":
                static8 = (18 * pc8 + 2 * p8) / 2**30
                mem = (18 * pc70 + 2 * p70) / RANKS / 2**30 + max(peak - static8, 0.0) * s_act
            elif stage in ("score", "costs", "eval"):
                mem = 2 * p70 / 2**30 + max(peak - static8, 0.0) * h70 / h8
            else:
                mem = None
            if mem is not None:
                out["gib_per_rank"] = round(mem, 1)
                out["fits_h200"] = mem <= H200_GIB
        rows.append(out)
    return {
        "formula": __doc__.split("\n\n", 1)[1].strip(),
        "inputs": {"P8": p8, "P70": p70, "r": round(r, 4), "H8": h8, "L8": l8, "H70": h70, "L70": l70,
                   "Pc8": pc8, "Pc70": round(pc70), "ranks": RANKS, "e_bld": round(e_bld, 4),
                   "e_bld_source": e_bld_source, "e_fsdp": round(e_fsdp, 4), "e_fsdp_source": e_fsdp_source, "act_scale": round(s_act, 4),
                   "h200_gib": H200_GIB},
        "stages": rows,
        "total_wall_s": round(sum(x.get("wall_s", 0.0) for x in rows), 1),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def stage_table(result: dict[str, Any]) -> str:
    """Markdown: the measured stages, then the 70B / 8-GPU projection with its formula and inputs."""
    title = (f"### pipeline, {result['shape']} shape ({result['parent']['params'] / 1e9:.2f}B params) "
             f"on {result['meta'].get('device', result['device'])}")
    lines = [title, "",
             "| stage | wall s | tokens | tokens/s | peak alloc GiB | peak reserved GiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["stages"]:
        shown = ({**row, "wall_s": "**failed**"} if "error" in row else
                 {**row, "wall_s": f"stopped after {row['interrupted_after_s']}"} if "interrupted_after_s" in row
                 else row)
        lines.append("| " + " | ".join(_cell(shown.get(k)) for k in
                                        ("stage", "wall_s", "tokens", "tokens_per_s", "peak_allocated_gib",
                                         "peak_reserved_gib")) + " |")
    lines.append(f"| **total** | {_cell(result['stages_wall_s'])} | | | | |")
    lines += [f"\n{row['stage']} failed: {row['error']}" for row in result["stages"] if "error" in row]
    proj = result.get("projection_70b_8gpu")
    if proj:
        lines += ["", f"### projection: Llama-3.1-70B shape on {proj['inputs']['ranks']} GPUs", "",
                  "| stage | rule | factor | wall s | tokens/s | GiB per rank | fits one H200 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in proj["stages"]:
            lines.append("| " + " | ".join(_cell(row.get(k)) for k in
                                            ("stage", "rule", "factor", "wall_s", "tokens_per_s",
                                             "gib_per_rank", "fits_h200")) + " |")
        lines.append(f"| **total** | | | {_cell(proj['total_wall_s'])} | | | |")
        lines += ["", "```", proj["formula"], "", "inputs: " + json.dumps(proj["inputs"]), "```"]
    return "\n".join(lines)


if __name__ == "__main__":  # re-project a recorded result with the efficiencies on disk now
    import sys

    recorded = json.loads(Path(sys.argv[1]).read_text())
    recorded["projection_70b_8gpu"] = project_70b(recorded)
    print(stage_table(recorded))
