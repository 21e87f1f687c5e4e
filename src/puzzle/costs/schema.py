"""The costs file: its schema, reading one back (checked), and finding the one for a workload and device.

`puzzle costs` writes one file per workload: `costs/<device>-<workload>.json`, where <device> is e.g.
`nvidia-h200` (measured) or `estimate` (analytic).

JSON schema (`"schema": "puzzle-costs/1"`; times in seconds, sizes in bytes):
    kind            "measured" | "estimate"  (an estimate must be labelled as such wherever shown)
    device          device name ("NVIDIA H200", or "estimate (roofline ...)")
    device_key      the <device> part of the file name
    device_memory_bytes   total device memory (estimate: null)
    dtype, torch, created, inputs_hash
    workload        {name, batch_size, prompt_len, gen_len (, tensor_parallel when > 1)}
    decode_context  cache slots a decode step reads, averaged over the generated tokens
    model           {hidden_size, num_attention_heads, head_dim, vocab_size, num_layers}
    fixed           {prefill_s, decode_step_s, sampling_s, params}: embedding, final norm, LM head, sampling
    attention       {variant name ("gqa8", "linear", "no_op"): VARIANT}
    ffn             {variant name ("swiglu14336", "linear", "no_op"): VARIANT}
      VARIANT = {prefill_s, decode_step_s, params, kv_bytes_per_token, prefill_rel_spread,
                 decode_rel_spread, prefill_spread_s, decode_spread_s, stack, oom}; times are per layer, the
      width-consistent ones (see `puzzle.costs.consistency`); rel spread = the timed stack's IQR / median,
      spread_s = that IQR per layer (seconds); null times when oom is true;
      stack = layers in the timed stack (0: a no-op, not timed): the N = `neighbours` layers of the
      variant with the parent's other half ("neighbourhood"), or k copies of the variant alone ("isolated")
    timing          {repeats, warmup, input_sets, median_rel_spread} (rel spread = IQR / median)
    graphs          the runtime's decode mode the times were measured with ("fused", "manual", ...; null: estimate)
    method          how the variants were timed (null: estimate):
                    "neighbourhood": N layers of the variant with the parent's most common other half (its
                    typical FFN for an attention variant, its typical attention for an FFN variant), minus the
                    same N layers with the variant a no-op, over N;
                    "isolated": k copies of the variant with a no-op other half, minus a 1-layer empty model, over k
    consistency     {rule, chains {attention: [gqa names, fewer KV heads first], ffn: [swiglu names, narrow
                    first]}, max_remeasure_rounds, raw {part: {name: {prefill_s, decode_step_s, *_rel_spread,
                    *_spread_s}}} (the first measurement), violations [{part, phase, narrow, wide, narrow_s,
                    wide_s, excess_s, spread_s, beyond_spread}] (in the first measurement), remeasured [{round,
                    variants {"part:name": times}}], remaining [violations after re-measuring], adjusted
                    [{part, variant, phase, measured_s, adjusted_s}] (the isotonic fit)}: `puzzle.costs.consistency`;
                    absent in files written before it (the same schema string: the key is an addition)
    calibration     null (estimate) or {method: "scale"|"offset"|"none", parent_measured {prefill_s,
                    decode_step_s, *_rel_spread}, parent_uncalibrated {prefill_s, decode_step_s},
                    prefill_scale, decode_scale, prefill_offset_s, decode_offset_s} or {method: "none", reason}
    roofline        {peak_flops, mem_bandwidth} (estimate only)
    parent_memory   memory model of the parent for this workload + {fits, max_batch_size}
    tensor_parallel only when workload.tensor_parallel > 1 (`puzzle.costs.sharding`): {degree, per_gpu
                    {attention|ffn: {name: {params, kv_bytes_per_token}}, fixed {params}}: what one GPU holds,
                    parent_per_gpu {weights_bytes, kv_cache_bytes, activation_bytes, total_bytes (+ fits,
                    max_batch_size when measured)}, measured: backend, timing; estimate: assumptions
                    {interconnect_bandwidth, allreduce_latency_s, allreduce, source}}. The times are one GPU's
                    (its shard with the all-reduces); the variant records keep the whole variant's params and KV
A model's time for the workload is fixed + the sum of its layers' attention and FFN variants, corrected by
the calibration against the whole parent timed the same way (`block_costs`, `fixed_costs`, `predict` in
`puzzle.costs.table`); those read the per-layer times alike whichever `method` produced them.
Costs measured on another device are never used silently: `load_costs` raises unless that device is asked
for by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from puzzle.core.errors import PuzzleError

SCHEMA = "puzzle-costs/1"
ESTIMATE_KEY = "estimate"
METHODS = ("neighbourhood", "isolated")
NO_OP = {"prefill_s": 0.0, "decode_step_s": 0.0, "params": 0, "kv_bytes_per_token": 0}


# ---- one model's time -------------------------------------------------------------------------------------


def read_costs_file(path: Path) -> dict[str, Any]:
    """One costs file, checked enough to be used; a damaged one is a one-line error naming it and the fix."""
    fix = "delete it and rerun `puzzle costs`"
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise PuzzleError(f"{path} is not a valid costs file ({e.msg} at line {e.lineno}); {fix}") from None
    except UnicodeDecodeError:
        raise PuzzleError(f"{path} is not a valid costs file (not UTF-8 text); {fix}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise PuzzleError(f"{path} is not a valid costs file (schema is not {SCHEMA}); {fix}")
    missing = [k for k in ("workload", "attention", "ffn", "fixed") if not isinstance(data.get(k), dict)]
    missing += [] if isinstance(data.get("device_key"), str) else ["device_key"]
    if missing:
        raise PuzzleError(f"{path} is not a valid costs file (no {', '.join(missing)}); {fix}")
    return data


def current_device_key() -> str:
    """This machine's device key: its GPU's ('nvidia-h200'), or 'estimate' without one."""
    # torch and the runtime are imported here, not above: a caller that names its device (the search) reads
    # costs files without torch
    import torch

    from puzzle.runtime.timing import device_key

    return device_key("cuda") if torch.cuda.is_available() else ESTIMATE_KEY


def load_costs(costs_dir: Path, workload: str, device: str | None = None) -> dict[str, Any]:
    """Costs of `workload` for `device` (a device key such as 'nvidia-h200', or 'estimate').

    device None means this machine's device ('estimate' without a GPU). Costs of another device are used
    only when that device is named explicitly, never silently.
    """
    costs_dir = Path(costs_dir)
    if (costs_dir / "costs").is_dir():
        costs_dir = costs_dir / "costs"
    explicit = device is not None
    device = device or current_device_key()
    path = costs_dir / f"{device}-{workload}.json"
    if not path.exists():
        others = sorted(p.name[: -len(f"-{workload}.json")] for p in costs_dir.glob(f"*-{workload}.json"))
        if others and not explicit:
            raise PuzzleError(
                f"costs for workload {workload!r} were made on {others}, not on this device ({device}); rerun "
                f"`puzzle costs` here, or name the target device explicitly (e.g. device={others[0]!r})"
            )
        raise PuzzleError(f"no costs for workload {workload!r} on {device} in {costs_dir}; run `puzzle costs` first")
    data = read_costs_file(path)
    if data.get("device_key") != device:
        raise PuzzleError(f"{path} holds costs of {data.get('device_key')!r}, not {device!r}; rerun `puzzle costs`")
    return data


def lookup_variant(costs: dict[str, Any], part: str, name: str, source: Path | str | None = None,
                   workload: str | None = None) -> dict[str, Any]:
    """The record of one `part` ("attention" | "ffn") variant; a missing or unmeasured one is an error naming
    the file (`source`), the workload and the fix. A no-op absent from the file costs nothing."""
    rec = costs[part].get(name)
    if rec is None and name == "no_op":
        return dict(NO_OP)
    where = source or "the costs"
    workload = workload or (costs.get("workload") or {}).get("name")
    if not isinstance(rec, dict):
        raise PuzzleError(f"{where} has no {part} variant {name!r} (it has {sorted(costs[part])}); rerun "
                          "`puzzle costs` after `puzzle library` so every variant of the search space is measured")
    if rec.get("oom") or rec.get("decode_step_s") is None:
        raise PuzzleError(f"{where}: {part} variant {name!r} did not fit in device memory for workload "
                          f"{workload!r}; lower that workload's batch size and rerun `puzzle costs`")
    for key in ("prefill_s", "decode_step_s", "params"):
        if not isinstance(rec.get(key), (int, float)):
            raise PuzzleError(f"{where}: {part} variant {name!r} lacks a numeric {key!r}; rerun `puzzle costs`")
    return rec
