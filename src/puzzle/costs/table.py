"""Reading costs: one layer's, the fixed and a whole model's time for a workload (`block_costs`, `fixed_costs`,
`predict`), and the search's per-(layer, candidate) view of one costs file (`CostTable`).

The one place that turns a costs file (`puzzle.costs.schema`) into times; torch-free, so the search, the
verification and the report read costs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puzzle.core.dtypes import compute_dtype_name, dtype_bytes, precision_bytes
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload, workload_by_name
from puzzle.costs.calibration import correction
from puzzle.costs.schema import load_costs, lookup_variant, read_costs_file
from puzzle.model.blocks import BlockConfig, ModelConfig


def workload_time(prefill_s: float, decode_step_s: float, w: Workload) -> float:
    """A part's time over the workload: its prefill share (first token) + gen_len - 1 decode steps."""
    return prefill_s + (w.gen_len - 1) * decode_step_s


def block_costs(costs: dict[str, Any], block: BlockConfig, workload: Workload | None = None,
                source: Path | str | None = None) -> dict[str, float]:
    """One layer's (calibrated) costs: prefill_s, decode_step_s, total_s (over the workload), params, KV bytes.

    The one place that turns a costs JSON into a block's time; `predict` and the search's `CostTable` use it.
    """
    w = workload or Workload(**costs["workload"])
    a = lookup_variant(costs, "attention", block.attention.name, source, w.name)
    f = lookup_variant(costs, "ffn", block.ffn.name, source, w.name)
    method, corr = correction(costs)
    out = {key: a[key] + f[key] for key in ("prefill_s", "decode_step_s")}
    if method == "scale":
        out = {key: value * corr[key] for key, value in out.items()}
    out["total_s"] = workload_time(out["prefill_s"], out["decode_step_s"], w)
    out["params"] = a["params"] + f["params"]
    out["kv_bytes_per_token"] = a.get("kv_bytes_per_token", 0) + f.get("kv_bytes_per_token", 0)
    return out


def fixed_costs(costs: dict[str, Any], workload: Workload | None = None) -> dict[str, float]:
    """Embedding, final norm, LM head and sampling (+ an "offset" calibration): prefill_s, decode_step_s, total_s."""
    w = workload or Workload(**costs["workload"])
    fixed = costs["fixed"]
    method, corr = correction(costs)
    out = {key: float(fixed.get(key, 0.0)) + (corr[key] if method == "offset" else 0.0)
           for key in ("prefill_s", "decode_step_s")}
    out["total_s"] = workload_time(out["prefill_s"], out["decode_step_s"], w)
    out["params"] = int(fixed.get("params", 0))
    return out


def predict(model: ModelConfig | list[BlockConfig] | tuple[BlockConfig, ...], costs: dict[str, Any],
            workload: Workload | None = None) -> dict[str, Any]:
    """Predicted prefill, decode and total time and throughput of a model from per-block costs.

    The first token comes from the prefill; the other gen_len - 1 come from decode steps.
    """
    blocks = model.blocks if isinstance(model, ModelConfig) else tuple(model)
    w = workload or Workload(**costs["workload"])
    fixed = fixed_costs(costs, w)
    prefill, step = fixed["prefill_s"], fixed["decode_step_s"]
    kv_per_token = 0
    for b in blocks:
        c = block_costs(costs, b, w)
        prefill += c["prefill_s"]
        step += c["decode_step_s"]
        kv_per_token += c["kv_bytes_per_token"]
    total = workload_time(prefill, step, w)
    return {
        "kind": costs["kind"], "device": costs["device"], "workload": w.name, "graphs": costs.get("graphs"),
        "calibration": correction(costs)[0],
        "prefill_s": prefill, "decode_step_s": step, "decode_s": total - prefill, "total_s": total,
        "output_tokens_per_s": w.batch_size * w.gen_len / total,
        "total_tokens_per_s": w.batch_size * (w.prompt_len + w.gen_len) / total,
        "kv_cache_bytes": kv_per_token * w.batch_size * w.max_seq_len,
    }


# ---- the search's table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostTable:
    """Costs of every candidate of every layer for one (device, workload); the MIP adds them up.

    total_s = the block's prefill time for the workload's prompt + (gen_len - 1) decode steps (seconds; the
    first token comes from the prefill), from `block_costs`, the same numbers `predict` adds up
    (calibrated against the whole parent when the costs file carries a calibration);
    throughput = batch * gen_len / (fixed_total_s + sum of the chosen blocks' total_s).
    Memory = weights + KV cache for batch x (prompt + generated) tokens, plus the parent's activation
    estimate from `puzzle.model.memory` as a fixed margin (so "fits" agrees with the costs stage's memory model).
    A tensor-parallel workload's memory is one GPU's: the per-GPU params and KV bytes the costs file states
    (`gpu_params`, `gpu_kv_bytes_per_token`), with the embedding, LM head and norms whole on every GPU.
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
    gpu_params: list[np.ndarray] | None = None  # TP: per layer [C_l], what one GPU holds
    gpu_kv_bytes_per_token: list[np.ndarray] | None = None  # TP: per layer [C_l], what one GPU caches

    def memory_coeffs(self) -> list[np.ndarray]:
        """Bytes per (layer, candidate): weights + KV cache for batch x (prompt + generated) tokens (per GPU)."""
        tokens = self.workload.batch_size * self.workload.max_seq_len
        params = self.gpu_params if self.gpu_params is not None else self.params
        kvs = self.gpu_kv_bytes_per_token if self.gpu_kv_bytes_per_token is not None else self.kv_bytes_per_token
        return [p * self.dtype_bytes + kv * tokens for p, kv in zip(params, kvs)]

    def fixed_memory(self) -> float:
        return self.fixed_params * self.dtype_bytes + self.fixed_memory_bytes

    def predict(self, choice: list[int]) -> dict[str, Any]:
        def pick(arrays: list[np.ndarray]) -> float:
            return float(sum(a[k] for a, k in zip(arrays, choice)))

        total = self.fixed_total_s + pick(self.total_s)
        tp = self.workload.tensor_parallel
        return {
            "device": self.device,
            "workload": self.workload.name,
            "throughput_tok_s": self.workload.output_tokens / total,
            "latency_s": total,
            "ttft_s": self.fixed_prefill_s + pick(self.prefill_s),
            "memory_bytes": self.fixed_memory() + pick(self.memory_coeffs()),  # per GPU under TP
            "params": self.fixed_params + int(pick(self.params)),
            "estimate": self.estimate,
            **({"tensor_parallel": tp} if tp > 1 else {}),  # absent at 1: solutions.json as it was
        }


def cost_table_from_json(data: dict[str, Any], candidates: list[list[BlockConfig]], path: Path,
                         device: str, workload_name: str) -> CostTable:
    """The table of `candidates` (per layer) from a costs file's contents (`puzzle.costs.schema`); `path` names
    the file in errors."""
    for key in ("attention", "ffn", "fixed"):
        if not isinstance(data.get(key), dict):
            raise PuzzleError(f"{path} has no '{key}' section; it is not a costs file: rerun `puzzle costs`")
    wl = data.get("workload")
    workload = Workload(**{k: wl[k] for k in ("name", "batch_size", "prompt_len", "gen_len")},
                        tensor_parallel=wl.get("tensor_parallel", 1)) \
        if isinstance(wl, dict) else workload_by_name(workload_name)
    per_gpu = (data.get("tensor_parallel") or {}).get("per_gpu")  # TP files: what one GPU holds
    precision = data.get("dtype", "bfloat16")
    dtype_size = precision_bytes(precision, f"{path}: dtype")
    # fp8 keeps the embedding and LM head (the fixed params) in bf16: their extra bytes are a fixed cost
    fixed_extra = dtype_bytes(compute_dtype_name(precision)) - dtype_size
    # Times come from `block_costs` / `fixed_costs` (calibration included), as `predict` adds them up.
    fixed = fixed_costs(data, workload)
    arrays: dict[str, list[np.ndarray]] = {"total": [], "prefill": [], "params": [], "kv": [], "gpu_params": [],
                                           "gpu_kv": []}
    for layer_cands in candidates:
        rows = []
        for block in layer_cands:
            c = block_costs(data, block, workload, source=path)
            gpu = _per_gpu(per_gpu, block, c, path)
            rows.append((c["total_s"], c["prefill_s"], c["params"], c["kv_bytes_per_token"], *gpu))
        cols = np.array(rows, dtype=float).reshape(-1, 6)
        for key, col in zip(arrays, cols.T):
            arrays[key].append(col)
    return CostTable(
        device=device, workload=workload, dtype_bytes=dtype_size,
        total_s=arrays["total"], prefill_s=arrays["prefill"], params=arrays["params"],
        kv_bytes_per_token=arrays["kv"],
        fixed_total_s=fixed["total_s"], fixed_prefill_s=fixed["prefill_s"], fixed_params=fixed["params"],
        fixed_memory_bytes=float((data.get("parent_memory") or {}).get("activation_bytes", 0.0))
        + fixed["params"] * fixed_extra,
        estimate=data.get("kind") == "estimate",
        gpu_params=arrays["gpu_params"] if per_gpu else None,
        gpu_kv_bytes_per_token=arrays["gpu_kv"] if per_gpu else None,
    )


def _per_gpu(per_gpu: dict[str, Any] | None, block: BlockConfig, whole: dict[str, float], path: Path
             ) -> tuple[float, float]:
    """(params, KV bytes per token) one GPU holds of `block` (the whole block without a TP section)."""
    if not per_gpu:
        return whole["params"], whole["kv_bytes_per_token"]
    parts = []
    for part, name in (("attention", block.attention.name), ("ffn", block.ffn.name)):
        rec = per_gpu[part].get(name)
        if rec is None and name != "no_op":
            raise PuzzleError(f"{path}: the tensor_parallel section has no {part} variant {name!r}; "
                              "rerun `puzzle costs`")
        parts.append(rec or {"params": 0, "kv_bytes_per_token": 0})
    return (sum(r["params"] for r in parts), sum(r["kv_bytes_per_token"] for r in parts))


def measured_workloads(costs_dir: Path, device: str) -> list[str]:
    """Workloads with a costs file for `device` ('auto': for the one device measured)."""
    found = {}
    for path in sorted(costs_dir.glob("*.json")):
        data = read_costs_file(path)  # a damaged file is an error naming it, never skipped
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
    """The `CostTable` of `workload` on `device` ('auto': the one device measured) from `costs_dir`."""
    path = costs_path(costs_dir, device, workload)
    dev = path.name[: -len(f"-{workload}.json")]
    data = load_costs(costs_dir, workload, dev)  # validates the schema and the device key
    return cost_table_from_json(data, candidates, path, dev, workload)
