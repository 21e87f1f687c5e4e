"""The calibration: the per-block sums of a costs file fitted to the whole parent timed on the device
(`fit_calibration`), and how a file's calibration corrects the times read from it (`correction`).

The sums of per-variant times miss what only a whole model shows (cache effects between different layers,
launch gaps). One measured model fixes one number per phase: "scale" multiplies every block's time (a child
with half the block time gets half the correction), "offset" adds the difference to the fixed costs; both keep
the MIP linear. Torch-free: `puzzle.costs.measure` times the parent, `puzzle.costs.table` applies the result.
"""

from __future__ import annotations

from typing import Any

from puzzle.costs.schema import lookup_variant
from puzzle.model.blocks import ModelConfig


def fit_calibration(model: ModelConfig, costs: dict[str, Any], method: str, parent_measured: dict[str, float]
                    ) -> dict[str, Any]:
    """The calibration section from the parent's measured prefill and decode step and the per-variant costs."""
    parts = [(lookup_variant(costs, "attention", b.attention.name), lookup_variant(costs, "ffn", b.ffn.name))
             for b in model.blocks]
    fixed = costs["fixed"]
    blocks_pf = sum(a["prefill_s"] + f["prefill_s"] for a, f in parts)
    blocks_dec = sum(a["decode_step_s"] + f["decode_step_s"] for a, f in parts)
    out: dict[str, Any] = {
        "method": method, "parent_measured": dict(parent_measured),
        "parent_uncalibrated": {"prefill_s": fixed["prefill_s"] + blocks_pf,
                                "decode_step_s": fixed["decode_step_s"] + blocks_dec},
    }
    for phase, blocks in (("prefill", blocks_pf), ("decode", blocks_dec)):
        key = "prefill_s" if phase == "prefill" else "decode_step_s"
        measured = out["parent_measured"][key]
        out[f"{phase}_offset_s"] = measured - out["parent_uncalibrated"][key]
        out[f"{phase}_scale"] = (measured - fixed[key]) / blocks if blocks > 0 else 1.0
    return out


def correction(costs: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The calibration a costs file carries: ("scale" | "offset", per-phase factor or seconds), or ("none", {})."""
    cal = costs.get("calibration") or {}
    method = cal.get("method", "none")
    if method == "scale":
        return method, {"prefill_s": cal["prefill_scale"], "decode_step_s": cal["decode_scale"]}
    if method == "offset":
        return method, {"prefill_s": cal["prefill_offset_s"], "decode_step_s": cal["decode_offset_s"]}
    return "none", {}
