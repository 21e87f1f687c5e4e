"""The costs stage: `run_costs(run_dir, cfg, workloads, search_space_blocks)` writes one costs file per workload,
`costs/<device>-<workload>.json` (the schema: `puzzle.costs.schema`), measured on the device
(`puzzle.costs.measure`) or, without one, estimated (`puzzle.costs.estimate`); a file whose inputs are unchanged
is kept (resumable). Reading the files back and predicting from them: `puzzle.costs.table`. A workload with
`tensor_parallel: n` is timed on n ranks the stage spawns (`puzzle.costs.tensor_parallel`) or estimated per GPU
(`puzzle.costs.sharding`); its file adds a `tensor_parallel` section, and files of n = 1 are unchanged.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.core.artifacts import hash_json, write_json
from puzzle.core.config import check_device, to_dict
from puzzle.core.dtypes import FP8, PRECISION_BYTES, compute_dtype_name, dtype_bytes, precision_name
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import clear_warnings, warn
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import Workload
from puzzle.costs.consistency import make_consistent, parent_anchors
from puzzle.costs.estimate import estimate_workload, split_variants
from puzzle.costs.measure import TimeModel, measure_workload
from puzzle.costs.schema import ESTIMATE_KEY, METHODS, SCHEMA, read_costs_file
from puzzle.costs.sharding import (
    ALLREDUCE_LATENCY_S,
    NVLINK_BANDWIDTH,
    max_batch_per_gpu,
    per_gpu_section,
)
from puzzle.costs.source import costs_source, roofline_gpu
from puzzle.costs.tensor_parallel import check_ranks, measure_tensor_parallel, tp_graph_mode
from puzzle.formats import load_model_config
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.model.memory import max_batch_size, mean_decode_context, memory_model
from puzzle.runtime.datasheet import datasheet_named
from puzzle.runtime.engine import GraphMode, resolve_graph_mode
from puzzle.runtime.tensor_parallel import check_tensor_parallel
from puzzle.runtime.timing import device_key, device_name
from puzzle.stages.library.store import Library

# The estimate's default roofline: the H200 SXM datasheet (dense tensor-core FLOP/s, HBM3e bandwidth).
ROOFLINE_GPU = datasheet_named("H200 SXM")
BF16_PEAK, FP8_PEAK = ROOFLINE_GPU.peak_flops["bfloat16"], ROOFLINE_GPU.peak_flops["fp8"]


@dataclass
class CostsConfig:
    mode: Literal["auto", "measure", "estimate"] = "auto"  # auto: measure on a GPU, estimate without one
    device: str = "cuda"
    dtype: str = "bfloat16"  # the deployment precision: bfloat16, float16, float32, or fp8 (`core.dtypes`)
    repeats: int = 10
    warmup: int = 3
    input_sets: int = 3
    decode_inner: int = 10  # decode steps timed back to back per sample
    # How a variant is timed: "neighbourhood" = in a stack of `neighbours` parent-like layers (the variant
    # with the parent's most common other half) minus that stack with the variant a no-op; "isolated" = a
    # stack of copies of the variant alone (other half a no-op) minus an empty 1-layer model. Neighbourhood
    # costs add up to whole-model times better (benchmarks/cost_additivity.py).
    method: Literal["neighbourhood", "isolated"] = "neighbourhood"
    neighbours: int = 4  # layers of a neighbourhood stack
    stack_bytes: int = 256 << 20  # isolated: stack copies of a variant until weights exceed the L2 ...
    max_stack: int = 8  # ... up to this many
    bucket: int = 128  # the runtime's decode bucket (cache prefix rounding), to match its attended length
    graphs: GraphMode = "auto"  # the runtime's decode mode to measure with (auto = the runtime's default)
    # Correct the per-block sums with the parent timed whole on the device: "scale" multiplies every block's
    # time (the MIP stays linear), "offset" adds the difference to the fixed costs, "none" keeps raw sums.
    calibrate: Literal["scale", "offset", "none"] = "scale"
    # Extra timing rounds for variants that break the width order (fewer KV heads or a narrower FFN timed
    # slower) by more than their spread; what still breaks it after them is fitted (`puzzle.costs.consistency`).
    consistency_remeasure: int = 2
    peak_flops: float = BF16_PEAK  # analytic roofline (ROOFLINE_GPU dense bf16; fp8: FP8_PEAK unless set)
    mem_bandwidth: float = ROOFLINE_GPU.bandwidth  # analytic roofline (ROOFLINE_GPU HBM3e)

    def __post_init__(self) -> None:
        for name in ("repeats", "input_sets", "decode_inner", "neighbours", "stack_bytes", "max_stack", "bucket",
                     "peak_flops", "mem_bandwidth"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"costs.{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise PuzzleError(f"costs.warmup must be >= 0, got {self.warmup}")
        if self.consistency_remeasure < 0:
            raise PuzzleError(f"costs.consistency_remeasure must be >= 0, got {self.consistency_remeasure}")
        self.dtype = precision_name(self.dtype, "costs.dtype")
        if self.dtype == FP8 and self.peak_flops == BF16_PEAK:
            self.peak_flops = FP8_PEAK  # the default roofline at the precision it prices (H100/H200 dense fp8)
        if self.method not in METHODS:
            raise PuzzleError(f"costs.method {self.method!r} is not supported; use one of {list(METHODS)}")
        check_device("costs.device", self.device)


def resolve_mode(cfg: CostsConfig) -> tuple[str, torch.device | None]:
    if cfg.mode == "estimate" or (cfg.mode == "auto" and not torch.cuda.is_available()):
        return "estimate", None
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PuzzleError("costs.mode=measure needs a CUDA GPU here; use costs.mode=estimate (analytic) or "
                          "costs.device=cpu")
    return "measured", device


def costs_for_workload(model: ModelConfig, blocks: list[BlockConfig], w: Workload, cfg: CostsConfig,
                       timer: TimeModel | None = None) -> dict[str, Any]:
    """One workload's costs file (without inputs_hash); `timer` replaces the engine timing (tests)."""
    kind, device = resolve_mode(cfg)
    atts, ffns = split_variants(blocks)
    ctx = mean_decode_context(w, cfg.bucket)
    eb = PRECISION_BYTES[cfg.dtype]  # layer weights and KV
    cb = dtype_bytes(compute_dtype_name(cfg.dtype))  # activations, embedding, LM head (fp8: bf16)
    mem = memory_model(model, w, eb, cb)
    if kind == "estimate":
        body = estimate_workload(model, atts, ffns, w, cfg, ctx)
        body["consistency"] = make_consistent(body, anchors=parent_anchors(model.blocks))  # monotone: no fit
        name = f"estimate (roofline of {roofline_gpu(cfg.peak_flops, cfg.mem_bandwidth, cfg.dtype)})"
        key, total = ESTIMATE_KEY, None
    else:
        if w.tensor_parallel > 1 and timer is None:  # spawned ranks (`puzzle.costs.tensor_parallel`)
            body = measure_tensor_parallel(model, atts, ffns, w, cfg, ctx, device)
        else:
            body = measure_workload(model, atts, ffns, w, cfg, ctx, device, timer)
        name, key = device_name(device), device_key(device)
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    spread = body.pop("median_rel_spread", None)
    body.setdefault("calibration", None)
    if total is not None:
        mem["fits"] = mem["total_bytes"] <= total
        mem["max_batch_size"] = max_batch_size(model, w.prompt_len, w.gen_len, total, eb, cb)
    graphs = resolve_graph_mode(cfg.graphs, device) if device is not None else None
    tp: dict[str, Any] = {}  # a section only in TP files: TP=1 files stay as they were
    if w.tensor_parallel > 1:
        tp = {"tensor_parallel": _tp_section(model, atts, ffns, w, kind, device, total, eb, cb)}
        graphs = tp_graph_mode(cfg.graphs, device) if device is not None else None
    return {
        "schema": SCHEMA, "kind": kind, "device": name, "device_key": key, "device_memory_bytes": total,
        "dtype": cfg.dtype, "torch": torch.__version__,
        "graphs": graphs,
        "method": cfg.method if kind == "measured" else None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "workload": w.to_dict(), "decode_context": ctx,
        "model": {"hidden_size": model.hidden_size, "num_attention_heads": model.num_attention_heads,
                  "head_dim": model.head_dim, "vocab_size": model.vocab_size, "num_layers": model.num_layers},
        **body,
        "timing": {"repeats": cfg.repeats, "warmup": cfg.warmup, "input_sets": cfg.input_sets,
                   "median_rel_spread": spread},
        "roofline": {"peak_flops": cfg.peak_flops, "mem_bandwidth": cfg.mem_bandwidth} if kind == "estimate" else None,
        "parent_memory": mem,
        **tp,
    }


def _tp_section(model: ModelConfig, atts: list[AttentionConfig], ffns: list[FFNConfig], w: Workload, kind: str,
                device: torch.device | None, total: int | None, eb: int, cb: int) -> dict[str, Any]:
    """The `tensor_parallel` section (`puzzle.costs.schema`): per-GPU sizes, how the times were made."""
    section = per_gpu_section(model, atts, ffns, w, eb, cb)
    if total is not None:
        section["parent_per_gpu"]["fits"] = section["parent_per_gpu"]["total_bytes"] <= total
        section["parent_per_gpu"]["max_batch_size"] = max_batch_per_gpu(section, w, total)
    if kind == "estimate":
        section["assumptions"] = {
            "interconnect_bandwidth": NVLINK_BANDWIDTH, "allreduce_latency_s": ALLREDUCE_LATENCY_S,
            "allreduce": "one per split sub-block (row-parallel o_proj / down_proj / linear): latency + "
                         "2 (n-1)/n x batch x tokens x hidden x bytes / bandwidth",
            "source": "datasheet NVLink 4 (H100/H200 SXM): 900 GB/s per GPU, both directions; latency assumed"}
    else:
        section["backend"] = "nccl" if device is not None and device.type == "cuda" else "gloo"
        section["timing"] = "each rank times its shard with the all-reduces inside; a sample is the max over ranks"
    return section


def _default_blocks(run: RunDir, model: ModelConfig) -> list[BlockConfig]:
    """The search space: every library candidate of every layer, and the parent's own blocks."""
    if not run.library.exists():
        return list(model.blocks)
    lib = Library.open(run.library)
    return [b for i in range(model.num_layers) for b in lib.candidates(i)] + list(model.blocks)


def run_costs(run_dir: Path, cfg: CostsConfig, workloads: list[Workload],
              search_space_blocks: list[BlockConfig] | None = None,
              model_config: ModelConfig | None = None) -> dict[str, Path]:
    """Write costs/<device>-<workload>.json for every workload (the run config's top-level `workloads`); a current
    file is kept (resumable)."""
    run = RunDir(run_dir)
    if model_config is None:
        if not run.parent.exists():
            raise PuzzleError(f"{run.parent} does not exist; run `puzzle import` first")
        model_config = load_model_config(run.parent)
    blocks = list(search_space_blocks) if search_space_blocks is not None else _default_blocks(run, model_config)
    if not blocks:
        raise PuzzleError("costs: the search space has no blocks; build the library first")
    if not workloads:
        raise PuzzleError("workloads is empty; name at least one workload")
    kind, device = resolve_mode(cfg)
    for w in workloads:  # before anything is timed: a TP workload this machine cannot measure fails now
        if w.tensor_parallel > 1:
            check_tensor_parallel(model_config, w.tensor_parallel, blocks,
                                  where=f"workload {w.name!r}: tensor_parallel={w.tensor_parallel}",
                                  knob="tensor_parallel degree")
            if device is not None:
                check_ranks(w, device, cfg.dtype)  # FP8 is refused here too, before the first timing
    key = ESTIMATE_KEY if kind == "estimate" else device_key(device)
    written: dict[str, Path] = {}
    clear_warnings(run.root, "costs")  # kept files warn again below
    for w in workloads:
        path = run.costs_file(key, w.name)
        inputs = hash_json({"model": model_config.to_dict(), "blocks": [b.to_dict() for b in blocks],
                            # the workloads beside cfg: the hash files written before they moved out of it
                            "cfg": {**to_dict(cfg), "workloads": [x.to_dict() for x in workloads]},
                            "workload": w.to_dict(), "kind": kind})
        written[w.name] = path
        try:
            kept = read_costs_file(path) if path.exists() else None
        except PuzzleError as e:  # a damaged file is measured again, not trusted and not skipped
            print(f"costs: {e.args[0].split(';')[0]}; measuring it again")
            kept = None
        if kept is not None and kept.get("inputs_hash") == inputs:
            _warn_uncalibrated(run.root, path, kept)
            continue
        data = costs_for_workload(model_config, blocks, w, cfg)
        data["inputs_hash"] = inputs
        write_json(path, data)
        label = f" ({costs_source(data)})" if kind == "estimate" else ""
        print(f"costs: wrote {path}{label}")
        _warn_uncalibrated(run.root, path, data)
    return written


def _warn_uncalibrated(run_dir: Path, path: Path, data: dict[str, Any]) -> None:
    """A measured file whose parent could not be timed predicts with raw per-block sums: say so in the run."""
    cal = data.get("calibration") or {}
    if cal.get("method") == "none" and cal.get("reason"):
        warn(run_dir, "costs", f"{path.name}: not calibrated against the whole parent ({cal['reason']}); "
                               "predictions use the raw per-block sums")
