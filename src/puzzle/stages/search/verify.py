"""Targets met as measured: the search's children timed on this GPU, the costs corrected, the search run again.

When the costs were measured on a GPU, every MIP solution with a throughput, latency or ttft target is timed
on its target workload exactly as `puzzle eval` will time the realized child (`evaluate.measure_throughput`:
the runtime, the same graphs mode, workload and repeats), next to the parent timed the same way. The
runtime's speed does not depend on weight values, so the child is built from its BlockConfigs with random
weights; no realize is needed. If a child misses its target, per-variant time factors are fitted to every
model measured so far (`puzzle.stages.search.correction`), the costs the MIP reads are multiplied by them and the
search runs again: at most `search.verify_rounds` measured searches. Each round is recorded in
`search/solutions.json` (`verify.history`: solutions, predicted, measured, the correction); every timing in
`search/verify.json`. A child still missing its target when the rounds run out is flagged
(`verify.meets_target: false`) and named in a warning. Estimated costs (no GPU) skip the check with a notice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from puzzle.core.artifacts import read_json
from puzzle.core.dtypes import FP8, PRECISION_BYTES, compute_dtype_name, torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import warn
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import Workload
from puzzle.costs.schema import load_costs
from puzzle.formats import load_model_config
from puzzle.model.blocks import BlockConfig, ModelConfig
from puzzle.model.decoder import build_model
from puzzle.runtime.bench import run_workload
from puzzle.runtime.fp8 import E4M3, quantize_fp8
from puzzle.runtime.timing import device_key
from puzzle.stages.search.correction import (
    PHASES,
    Equation,
    Factors,
    corrected_table,
    fit_factors,
    model_equations,
    part_costs,
    variant_keys,
)
from puzzle.stages.search.solve import SearchInputs, point_specs, search
from puzzle.stages.search.targets import ConstraintSpec, parse_target

if TYPE_CHECKING:
    from puzzle.stages.search.stage import SearchConfig  # the stage imports this module

# blocks, workload -> `bench.run_workload`'s dict (ttft_s, decode_s, total_s, output_tokens_per_s, graphs)
Measurer = Callable[[list[BlockConfig], Workload], dict[str, Any]]
TIME_KINDS = ("throughput", "latency", "ttft")


def time_child(parent: ModelConfig, blocks: list[BlockConfig], workload: Workload, device: str,
               dtype: str, graphs: str) -> dict[str, Any]:
    """A random-weight model of the parent's shape with `blocks`, timed as `puzzle eval` times a child
    (`runtime.bench.run_workload`, on CUDA only)."""
    try:
        known = dtype in PRECISION_BYTES
        model = build_model(parent.with_blocks(blocks), device=device,
                            dtype=torch_dtype(compute_dtype_name(dtype)) if known else torch.bfloat16, seed=0).eval()
        if dtype == FP8:  # timed as the costs were: FP8 linears and KV cache
            quantize_fp8(model)
        if model.embed_tokens.weight.device.type != "cuda":
            run: dict[str, Any] = {"skipped": "no GPU: throughput is measured on CUDA only"}
        else:
            try:
                run = {workload.name: run_workload(model, workload, graphs=graphs,
                                                   kv_dtype=E4M3 if dtype == FP8 else None)}
            except PuzzleError as e:  # e.g. the workload does not fit this model
                run = {workload.name: {"error": str(e)}}
    except torch.cuda.OutOfMemoryError:
        run = {"skipped": "out of device memory"}
    finally:
        model = None  # free the weights before the next child
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    result = run.get(workload.name, {})
    if "output_tokens_per_s" not in result:
        raise PuzzleError(f"could not time a child on workload {workload.name!r}: "
                          f"{result.get('error') or run.get('skipped') or 'no result'}")
    return result


def gpu_measurer(parent_dir: Path, costs_device: str, dtype: str, graphs: str) -> Measurer | str:
    """A measurer on this GPU (`time_child` per model), or why there is none."""
    if not torch.cuda.is_available():
        return "no GPU here to time the children on"
    here = device_key("cuda")
    if here != costs_device:
        return f"the costs were measured on {costs_device} but this GPU is {here}"
    parent = load_model_config(parent_dir)
    return lambda blocks, workload: time_child(parent, blocks, workload, "cuda", dtype, graphs)


def eval_graphs(run_dir: Path | RunDir) -> str:
    """The graphs mode `puzzle eval` times children in: the run's saved eval.graphs, else the default."""
    path = RunDir(run_dir).config
    saved = read_json(path).get("eval", {}).get("graphs") if path.exists() else None
    return saved if isinstance(saved, str) else "auto"


def time_workloads(cfg: SearchConfig) -> list[str]:
    """Workloads of the throughput / latency / ttft constraints (a sweep changes targets, not workloads)."""
    return list(dict.fromkeys(c.workload for c in cfg.constraints if c.kind in TIME_KINDS and c.workload))


def _fmt(value: float, kind: str, factor: bool) -> str:
    if kind == "throughput":
        return f"{value:.3f}x" if factor else f"{value:.5g} tok/s"
    return f"{value:.4g} s"


def check(spec: ConstraintSpec, predicted: dict[str, Any], uncorrected: dict[str, Any], run: dict[str, Any],
          parent_run: dict[str, Any]) -> dict[str, Any]:
    """One target against one measured run: predicted (the costs the MIP used), uncorrected, measured, met."""
    value, factor = parse_target(spec.kind, spec.target)
    if spec.kind == "throughput":
        scale = parent_run["output_tokens_per_s"] if factor else 1.0
        key = "speedup" if factor else "throughput_tok_s"
        measured = run["output_tokens_per_s"] / scale
        met = measured >= value
    else:
        key = "latency_s" if spec.kind == "latency" else "ttft_s"
        measured = run["total_s" if spec.kind == "latency" else "ttft_s"]
        met = measured <= value
    return {"kind": spec.kind, "workload": spec.workload, "target": spec.target, "predicted": predicted[key],
            "predicted_uncorrected": uncorrected[key], "measured": measured, "met": bool(met),
            "text": f"{_fmt(measured, spec.kind, factor)} measured, {_fmt(predicted[key], spec.kind, factor)} "
                    f"predicted, target {spec.target}"}


class Verifier:
    """The measurements so far, the factors fitted to them, and the corrected search inputs."""

    def __init__(self, inputs: SearchInputs, cfg: SearchConfig, run_dir: Path, measure: Measurer | None,
                 workloads: list[str]) -> None:
        self.base, self.cfg, self.run_dir, self.measure = inputs, cfg, run_dir, measure
        self.data = {w: load_costs(RunDir(run_dir).costs, w, inputs.tables[w].device) for w in workloads}
        self.workload = {w: inputs.tables[w].workload for w in workloads}
        self.parts = {w: part_costs(self.data[w], inputs.candidates, self.workload[w]) for w in workloads}
        self.parent_parts = {w: part_costs(self.data[w], [[b] for b in inputs.parent_blocks], self.workload[w])
                             for w in workloads}
        self.runs: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
        self.measurements: list[dict[str, Any]] = []
        self.factors: dict[str, Factors] = {}

    def run(self, blocks: list[BlockConfig], w: str) -> dict[str, Any]:
        """The measured run of a model of `blocks` on workload `w` (each model timed once)."""
        key = (w, tuple(b.name for b in blocks))
        if key not in self.runs:
            self.runs[key] = self.measure(blocks, self.workload[w])
            self.measurements.append({"workload": w, "block_names": list(key[1]),
                                      "blocks": [b.to_dict() for b in blocks], "run": self.runs[key]})
        return self.runs[key]

    def _uncorrected(self, blocks: list[BlockConfig], w: str) -> dict[str, Any]:
        choice = [cands.index(b) for cands, b in zip(self.base.candidates, blocks)]
        pred = self.base.tables[w].predict(choice)
        parent = self.base.parent_tables[w].predict([0] * len(blocks))
        return {**pred, "speedup": pred["throughput_tok_s"] / parent["throughput_tok_s"]}

    def measure_round(self, result: dict[str, Any], number: int) -> dict[str, Any]:
        """Time every solution of `result` on its time targets; attach `verify` to each; the round's record."""
        record = []
        for sol in result["solutions"]:
            blocks = [BlockConfig.from_dict(b) for b in sol["blocks"]]
            checks, measured = [], {}
            for spec in point_specs(self.cfg, sol["target"]):
                if spec.kind not in TIME_KINDS:
                    continue
                w = spec.workload
                run, parent_run = self.run(blocks, w), self.run(self.base.parent_blocks, w)
                measured[w] = {k: run[k] for k in ("output_tokens_per_s", "ttft_s", "decode_s", "total_s")}
                measured[w]["speedup"] = run["output_tokens_per_s"] / parent_run["output_tokens_per_s"]
                c = check(spec, sol["predicted"][w], self._uncorrected(blocks, w), run, parent_run)
                checks.append(c)
                print(f"search: round {number}: {sol['name']} on {w}: {c['text']}: {'met' if c['met'] else 'MISSED'}")
            met = all(c["met"] for c in checks)
            sol["verify"] = {"meets_target": met, "round": number, "checks": checks, "measured": measured}
            record.append({"name": sol["name"], "target": sol["target"], "block_names": sol["block_names"],
                           "checks": checks, "met": met})
        return {"round": number, "solutions": record, "met": all(r["met"] for r in record), "correction": None}

    def refit(self) -> dict[str, Factors]:
        """Fit the factors of every measured workload: the parent's variants to the parent's own run, then
        the other variants to every child measured on it so far (the parent's held)."""
        parent_names = [b.name for b in self.base.parent_blocks]
        parent_keys = {k for b in self.base.parent_blocks for k in variant_keys(b)}
        for w in self.workload:
            eqs: dict[tuple[str, bool], list[Equation]] = {}
            for m in self.measurements:
                if m["workload"] == w:
                    blocks = [BlockConfig.from_dict(b) for b in m["blocks"]]
                    for phase, eq in model_equations(self.data[w], blocks, self.workload[w], m["run"]).items():
                        eqs.setdefault((phase, m["block_names"] == parent_names), []).append(eq)
            factors: Factors = {}
            for phase in PHASES:
                parent = fit_factors(eqs.get((phase, True), []))
                pinned = {k: parent.get(k, 1.0) for k in parent_keys}
                factors[phase] = fit_factors(eqs.get((phase, False), []), pinned)
            self.factors[w] = factors
        return self.factors

    def corrected_inputs(self) -> SearchInputs:
        """The search's inputs with the measured workloads' costs multiplied by the fitted factors."""
        tables, parents = dict(self.base.tables), dict(self.base.parent_tables)
        for w, f in self.factors.items():
            tables[w] = corrected_table(tables[w], self.parts[w], f)
            parents[w] = corrected_table(parents[w], self.parent_parts[w], f)
        return replace(self.base, tables=tables, parent_tables=parents)


def _skip_reason(inputs: SearchInputs, cfg: SearchConfig, workloads: list[str]) -> str | None:
    if cfg.verify_rounds == 0:
        return "search.verify_rounds is 0"
    if not workloads:
        return "no throughput, latency or ttft target"
    if any(inputs.tables[w].estimate for w in workloads):
        return "the costs are an analytic estimate (no GPU measured them)"
    tp = [f"{w} (TP {inputs.tables[w].workload.tensor_parallel})" for w in workloads
          if inputs.tables[w].workload.tensor_parallel > 1]
    if tp:
        return f"{', '.join(tp)} is tensor-parallel and the check times children on one GPU"
    return None


def verified_search(inputs: SearchInputs, cfg: SearchConfig, run_dir: Path, graphs: str = "auto",
                    measure: Measurer | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`search`, then measure-correct-search rounds -> (solutions.json content, verify.json content or None)."""
    run_dir = Path(run_dir)
    result = search(inputs, cfg)
    workloads = time_workloads(cfg)
    reason = _skip_reason(inputs, cfg, workloads)
    verifier = None if reason else Verifier(inputs, cfg, run_dir, measure, workloads)
    if verifier is not None and measure is None:
        w = workloads[0]
        got = gpu_measurer(RunDir(run_dir).parent, inputs.tables[w].device, str(verifier.data[w].get("dtype")), graphs)
        reason, verifier.measure = (got, None) if isinstance(got, str) else (None, got)
    if reason is not None:
        if cfg.verify_rounds != 0 and workloads:
            print(f"search: {reason}; the children's targets are not checked by measurement here")
        result["verify"] = {"status": "skipped", "reason": reason}
        return result, None
    history: list[dict[str, Any]] = []
    status, note = "verified", ""
    try:
        for number in range(1, cfg.verify_rounds + 1):
            if number > 1:
                try:
                    result = search(verifier.corrected_inputs(), cfg)
                except PuzzleError as e:  # no child meets the targets under the corrected costs
                    status, note = "missed", f"after correcting the costs by what was measured, {e}"
                    break
            entry = verifier.measure_round(result, number)
            history.append(entry)
            if entry["met"]:
                break
            if number == cfg.verify_rounds:
                status, note = "missed", f"the {number} rounds of search.verify_rounds ran out"
                break
            entry["correction"] = copy.deepcopy(verifier.refit())  # later rounds refit the same dict
    except PuzzleError as e:  # a child could not be timed (e.g. it does not fit): nothing more to learn
        status, note = "error", str(e)
        warn(run_dir, "search", f"the targets were not checked by measurement: {e}")
    if status == "missed":
        for sol in result["solutions"]:
            for c in sol.get("verify", {}).get("checks", []):
                if not c["met"]:
                    warn(run_dir, "search", f"{sol['name']} misses its {c['kind']} target on {c['workload']}: "
                                            f"{c['text']} ({note})")
    result["verify"] = {"status": status, "note": note, "rounds": len(history), "verify_rounds": cfg.verify_rounds,
                        "graphs": graphs, "factors": verifier.factors, "history": history,
                        "parent_measured": {w: verifier.runs.get((w, tuple(b.name for b in inputs.parent_blocks)))
                                            for w in workloads}}
    return result, {"status": status, "graphs": graphs, "measurements": verifier.measurements,
                    "factors": verifier.factors}

