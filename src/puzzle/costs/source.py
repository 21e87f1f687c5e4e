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
    return bool(costs) and costs.get("kind") != "measured"


def costs_source(costs: dict[str, Any] | None) -> str:
    """One phrase for a costs file's contents: an ESTIMATE of which GPU, or measured on which device."""
    if not costs:
        return "no costs file (run `puzzle costs`)"
    if costs.get("kind") == "measured":
        return f"per-block costs measured on {costs.get('device', '?')}"
    roof = costs.get("roofline") or {}
    if roof.get("peak_flops") and roof.get("mem_bandwidth"):
        gpu = roofline_gpu(roof["peak_flops"], roof["mem_bandwidth"], costs.get("dtype", "bfloat16"))
    else:  # files written before the roofline was recorded
        gpu = "a datasheet GPU"
    return f"ESTIMATE from an analytic roofline of {gpu}; not measured"


def short_source(costs: dict[str, Any] | None) -> str:
    """A few words for titles and column headers: 'ESTIMATE, datasheet H200 SXM roofline' or 'measured, <device>'."""
    if not costs:
        return "no costs"
    if costs.get("kind") == "measured":
        return f"measured, {costs.get('device', '?')}"
    roof = costs.get("roofline") or {}
    spec = datasheet_of_roofline(roof["peak_flops"], roof["mem_bandwidth"], costs.get("dtype", "bfloat16")) \
        if roof.get("peak_flops") and roof.get("mem_bandwidth") else None
    return f"ESTIMATE, {f'datasheet {spec.name}' if spec else 'analytic'} roofline"
