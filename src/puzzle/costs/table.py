"""The search's view of costs: per-(layer, candidate) time, params and KV bytes for one workload (`CostTable`),
built from the measured `costs/<device>-<workload>.json` in one function, and the predicted cost of a child.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puzzle.model.blocks import BlockConfig
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload, workload_by_name

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class CostTable:
    """Costs of every candidate of every layer for one (device, workload); the MIP adds them up.

    total_s = the block's prefill time for the workload's prompt + (gen_len - 1) decode steps (seconds; the
    first token comes from the prefill), from `puzzle.costs.stage.block_costs`, the same numbers `predict` adds up
    (calibrated against the whole parent when the costs file carries a calibration);
    throughput = batch * gen_len / (fixed_total_s + sum of the chosen blocks' total_s).
    Memory = weights + KV cache for batch x (prompt + generated) tokens, plus the parent's activation
    estimate from `puzzle.model.memory` as a fixed margin (so "fits" agrees with the costs stage's memory model).
    """

    device: str
    workload: Workload
    dtype_bytes: int
    total_s: list[np.ndarray]  # per layer [C_l]
    prefill_s: list[np.ndarray]  # per layer [C_l]: contribution to time-to-first-token
    params: list[np.ndarray]  # per layer [C_l]
    kv_bytes_per_token: list[np.ndarray]  # per layer [C_l]: K+V bytes one token adds to the cache
    fixed_total_s: float  # embedding, final norm, LM head, sampling over the whole workload
    fixed_prefill_s: float
    fixed_params: int  # embedding (+ untied LM head) + final norm
    fixed_memory_bytes: float = 0.0  # anything else the memory model counts (workspace, activations)
    estimate: bool = False  # analytic roofline estimate rather than a measurement

    def memory_coeffs(self) -> list[np.ndarray]:
        """Bytes per (layer, candidate): weights + KV cache for batch x (prompt + generated) tokens."""
        tokens = self.workload.batch_size * self.workload.max_seq_len
        return [p * self.dtype_bytes + kv * tokens for p, kv in zip(self.params, self.kv_bytes_per_token)]

    def fixed_memory(self) -> float:
        return self.fixed_params * self.dtype_bytes + self.fixed_memory_bytes

    def predict(self, choice: list[int]) -> dict[str, Any]:
        def pick(arrays: list[np.ndarray]) -> float:
            return float(sum(a[k] for a, k in zip(arrays, choice)))

        total = self.fixed_total_s + pick(self.total_s)
        return {
            "device": self.device,
            "workload": self.workload.name,
            "throughput_tok_s": self.workload.output_tokens / total,
            "latency_s": total,
            "ttft_s": self.fixed_prefill_s + pick(self.prefill_s),
            "memory_bytes": self.fixed_memory() + pick(self.memory_coeffs()),
            "params": self.fixed_params + int(pick(self.params)),
            "estimate": self.estimate,
        }


def _variant(section: dict[str, Any], name: str, kind: str, path: Path, workload: str) -> dict[str, float]:
    entry = section.get(name)
    if entry is None and name == "no_op":
        return {"prefill_s": 0.0, "decode_step_s": 0.0, "params": 0, "kv_bytes_per_token": 0}
    if isinstance(entry, dict) and entry.get("oom"):
        raise PuzzleError(f"{path}: {kind} '{name}' did not fit in device memory for workload '{workload}'; "
                          "lower that workload's batch size and rerun `puzzle costs`")
    if not isinstance(entry, dict):
        raise PuzzleError(f"{path} has no {kind} variant '{name}' (it has {sorted(section)}); "
                          "rerun `puzzle costs` after `puzzle library` so every variant is measured")
    for key in ("prefill_s", "decode_step_s", "params"):
        if not isinstance(entry.get(key), (int, float)):
            raise PuzzleError(f"{path}: {kind} '{name}' lacks a numeric '{key}'; rerun `puzzle costs`")
    return entry


def cost_table_from_json(data: dict[str, Any], candidates: list[list[BlockConfig]], path: Path,
                         device: str, workload_name: str) -> CostTable:
    """The one place that knows the costs JSON layout (`puzzle.costs.stage`, schema puzzle-costs/1)."""
    for key in ("attention", "ffn", "fixed"):
        if not isinstance(data.get(key), dict):
            raise PuzzleError(f"{path} has no '{key}' section; it is not a costs file: rerun `puzzle costs`")
    wl = data.get("workload")
    workload = Workload(**{k: wl[k] for k in ("name", "batch_size", "prompt_len", "gen_len")}) \
        if isinstance(wl, dict) else workload_by_name(workload_name)
    dtype = str(data.get("dtype", "bfloat16")).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise PuzzleError(f"{path}: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    # Times come from `puzzle.costs.stage.block_costs` / `fixed_costs` (calibration included), as `predict` does.
    from puzzle.costs.stage import block_costs, fixed_costs

    fixed = fixed_costs(data, workload)
    arrays: dict[str, list[np.ndarray]] = {"total": [], "prefill": [], "params": [], "kv": []}
    for layer_cands in candidates:
        rows = []
        for block in layer_cands:
            _variant(data["attention"], block.attention.name, "attention", path, workload.name)  # clear errors
            _variant(data["ffn"], block.ffn.name, "ffn", path, workload.name)
            c = block_costs(data, block, workload)
            rows.append((c["total_s"], c["prefill_s"], c["params"], c["kv_bytes_per_token"]))
        cols = np.array(rows, dtype=float).reshape(-1, 4)
        for key, col in zip(arrays, cols.T):
            arrays[key].append(col)
    return CostTable(
        device=device, workload=workload, dtype_bytes=DTYPE_BYTES[dtype],
        total_s=arrays["total"], prefill_s=arrays["prefill"], params=arrays["params"],
        kv_bytes_per_token=arrays["kv"],
        fixed_total_s=fixed["total_s"], fixed_prefill_s=fixed["prefill_s"], fixed_params=fixed["params"],
        fixed_memory_bytes=float((data.get("parent_memory") or {}).get("activation_bytes", 0.0)),
        estimate=data.get("kind") == "estimate",
    )


def measured_workloads(costs_dir: Path, device: str) -> list[str]:
    """Workloads with a costs file for `device` ('auto': for the one device measured)."""
    from puzzle.costs.stage import read_costs_file  # a damaged file is an error naming it, never skipped

    found = {}
    for path in sorted(costs_dir.glob("*.json")):
        data = read_costs_file(path)
        found[path] = (data["device_key"], data["workload"].get("name"))
    devices = sorted({d for d, _ in found.values()})
    if device == "auto" and len(devices) > 1:
        raise PuzzleError(f"{costs_dir} holds costs of several devices ({devices}); set search.device to the target")
    return [w for d, w in found.values() if device in ("auto", d)]


def costs_path(costs_dir: Path, device: str, workload: str) -> Path:
    """`costs/<device>-<workload>.json`; device 'auto' is allowed only when exactly one device measured it."""
    if device != "auto":
        path = costs_dir / f"{device}-{workload}.json"
        if not path.exists():
            have = sorted(p.name for p in costs_dir.glob(f"*-{workload}.json"))
            raise PuzzleError(f"{path} does not exist (found {have or 'none'}); run `puzzle costs` on the target "
                              "device or set search.device to one that was measured")
        return path
    found = sorted(costs_dir.glob(f"*-{workload}.json"))
    if not found:
        raise PuzzleError(f"no costs for workload '{workload}' in {costs_dir}; run `puzzle costs` with that workload")
    if len(found) > 1:
        raise PuzzleError(f"costs for '{workload}' exist for several devices ({[p.name for p in found]}); "
                          "set search.device to the target device")
    return found[0]


def load_cost_table(costs_dir: Path, device: str, workload: str, candidates: list[list[BlockConfig]]) -> CostTable:
    from puzzle.costs.stage import load_costs  # validates the schema and the device key

    path = costs_path(costs_dir, device, workload)
    dev = path.name[: -len(f"-{workload}.json")]
    return cost_table_from_json(load_costs(costs_dir, workload, dev), candidates, path, dev, workload)
