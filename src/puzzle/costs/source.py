"""Words for where a costs file's numbers come from, so that no estimate is shown as a measurement.

An estimate is an analytic roofline (`puzzle.costs.estimate`) of a datasheet GPU, never timed: every table,
CSV and plot axis that shows a number predicted from it says "estimate" and names that GPU.
"""

from __future__ import annotations

from typing import Any

from puzzle.runtime.datasheet import datasheet_of_roofline


def roofline_gpu(peak_flops: float, bandwidth: float, dtype: str = "bfloat16") -> str:
    """'datasheet H200 SXM: 989 TFLOP/s, 4.80 TB/s' (or 'no datasheet GPU: ...' for numbers of none)."""
    spec = datasheet_of_roofline(peak_flops, bandwidth, dtype)
    name = f"datasheet {spec.name}" if spec else "no datasheet GPU"
    return f"{name}: {peak_flops / 1e12:.0f} TFLOP/s {dtype}, {bandwidth / 1e12:.2f} TB/s"


def is_estimate(costs: dict[str, Any] | None) -> bool:
    """Whether a costs file holds an analytic estimate (anything not measured counts as one)."""
    return bool(costs) and costs.get("kind") != "measured"


def is_estimated(predicted: dict[str, Any] | None) -> bool:
    """Whether a prediction in solutions.json (`parent[workload]`, a solution's `predicted[workload]`) was made
    from estimated costs: the search records it, so it holds whatever costs file is on disk now."""
    return bool((predicted or {}).get("estimate"))


def prediction_costs(costs: dict[str, Any] | None, predicted: dict[str, Any] | None) -> dict[str, Any] | None:
    """The costs to name as a prediction's source: `costs`, or a bare estimate where the prediction is estimated
    but `costs` is absent or measured (solutions.json decides what its numbers are)."""
    return {"kind": "estimate"} if is_estimated(predicted) and not is_estimate(costs) else costs


def prediction_label(predicted: dict[str, Any] | None, estimated: str = "est.", measured: str = "pred.") -> str:
    """The word for a predicted number: `estimated` ('est.') from estimated costs, else `measured` ('pred.')."""
    return estimated if is_estimated(predicted) else measured


def _roofline(costs: dict[str, Any]) -> tuple[float, float, str] | None:
    """An estimate's (peak FLOP/s, bandwidth, dtype); None for files written before the roofline was recorded."""
    roof = costs.get("roofline") or {}
    if not (roof.get("peak_flops") and roof.get("mem_bandwidth")):
        return None
    return roof["peak_flops"], roof["mem_bandwidth"], costs.get("dtype", "bfloat16")


def costs_source(costs: dict[str, Any] | None) -> str:
    """One phrase for a costs file's contents: an ESTIMATE of which GPU, or measured on which device."""
    if not costs:
        return "no costs file (run `puzzle costs`)"
    if not is_estimate(costs):
        return f"per-block costs measured on {costs.get('device', '?')}"
    roof = _roofline(costs)
    gpu = roofline_gpu(*roof) if roof else "a datasheet GPU"
    return f"ESTIMATE from an analytic roofline of {gpu}; not measured"


def short_source(costs: dict[str, Any] | None) -> str:
    """A few words for titles and column headers: 'ESTIMATE, datasheet H200 SXM roofline' or 'measured, <device>'."""
    if not costs:
        return "no costs"
    if not is_estimate(costs):
        return f"measured, {costs.get('device', '?')}"
    roof = _roofline(costs)
    spec = datasheet_of_roofline(*roof) if roof else None
    return f"ESTIMATE, {f'datasheet {spec.name}' if spec else 'analytic'} roofline"
