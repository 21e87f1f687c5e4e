"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory:
  state.json              step, log, scheduler, fingerprint, world size, parallel mode (rank 0)
  rank{r}.safetensors     rank r's tensors: its RNG state, and its model + optimizer state where it owns one
  rank{r}.json            the structure around those tensors (optimizer param groups, numpy/python RNG, ...)
Under FSDP2 every rank writes its own shards of the model and optimizer state, so no rank ever holds the whole
state; under DDP or one process the state is the same on every rank and only rank 0's copy is written. Resume
needs the same world size and mode (the fingerprint covers both), so the shards fit the ranks that load them.
The directory is built under a temporary name and swapped in whole (`replace_dir`): a kill mid-save keeps the
previous checkpoint.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from puzzle.core.artifacts import load_tensors, read_json, replace_dir, save_tensors, write_json
from puzzle.core.distributed import DistInfo, barrier

FORMAT = "puzzle-train-checkpoint/1"
SHARDED = StateDictOptions(full_state_dict=False)  # FSDP2: DTensors holding this rank's shards; else plain


# ---- JSON + tensors codec ---------------------------------------------------------------------------------


def pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of `obj`; its tensors move into `tensors` (DTensors as their local shard + layout)."""
    if isinstance(obj, DTensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.to_local()
        return {"__dtensor__": key, "device": obj.device.type, "shape": list(obj.shape), "stride": list(obj.stride()),
                "placements": [_placement(p) for p in obj.placements]}
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key, "device": obj.device.type}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors), pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training checkpoint")


def unpack(obj: Any, tensors: dict[str, torch.Tensor], device: torch.device, mesh: DeviceMesh | None) -> Any:
    """Inverse of `pack`; tensors saved from an accelerator go to `device`, DTensors are rebuilt on `mesh`."""
    if isinstance(obj, list):
        return [unpack(v, tensors, device, mesh) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__dtensor__" in obj:
        t = tensors[obj.get("__tensor__") or obj["__dtensor__"]]
        t = t if obj["device"] == "cpu" else t.to(device)
        if "__tensor__" in obj:
            return t
        if mesh is None:
            raise ValueError("the checkpoint holds sharded tensors but the model is not sharded")
        return DTensor.from_local(t, mesh, [_placement_of(p) for p in obj["placements"]], run_check=False,
                                  shape=torch.Size(obj["shape"]), stride=tuple(obj["stride"]))
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(unpack(v, tensors, device, mesh) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {unpack(k, tensors, device, mesh): unpack(v, tensors, device, mesh) for k, v in obj["__items__"]}
    return {k: unpack(v, tensors, device, mesh) for k, v in obj.items()}


def _placement(p: Any) -> str:
    if isinstance(p, Shard) and type(p) is Shard:
        return f"shard:{p.dim}"
    if isinstance(p, Replicate):
        return "replicate"
    raise TypeError(f"cannot store a tensor placed as {p!r} in a training checkpoint")


def _placement_of(s: str) -> Shard | Replicate:
    return Replicate() if s == "replicate" else Shard(int(s.removeprefix("shard:")))


# ---- RNG --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save / load ------------------------------------------------------------------------------------------


def _owns_weights(mode: str, info: DistInfo) -> bool:
    return mode == "fsdp" or info.is_main


def _mesh(model: nn.Module) -> DeviceMesh | None:
    return next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                    log: dict[str, Any], fingerprint: str, mode: str, info: DistInfo) -> None:
    """Collective: every rank writes its part into a temporary directory; rank 0 swaps it in as `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state: dict[str, Any] = {"rng": rng_state()}
    if _owns_weights(mode, info):
        state["model"] = get_model_state_dict(model, options=SHARDED)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=SHARDED)
    tensors: dict[str, torch.Tensor] = {}
    structure = pack(state, tensors)
    save_tensors(tmp / f"rank{info.rank}.safetensors", tensors)
    write_json(tmp / f"rank{info.rank}.json", structure)
    barrier()
    if info.is_main:
        no_tensors: dict[str, torch.Tensor] = {}
        write_json(tmp / "state.json", {
            "format": FORMAT, "step": step, "fingerprint": fingerprint, "world_size": info.world_size, "mode": mode,
            "scheduler": pack(scheduler.state_dict(), no_tensors), "log": log})
        assert not no_tensors, "the LR scheduler's state holds tensors"
        replace_dir(tmp, path)
    barrier()


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    fingerprint: str, mode: str, info: DistInfo) -> tuple[int, dict[str, Any]] | None:
    """Restore model, optimizer, scheduler and this rank's RNG; (step, log), or None when `path` holds no
    checkpoint of this very run (other config, inputs, world size or mode: training starts afresh)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    meta = read_json(path / "state.json")
    if (meta.get("format"), meta.get("fingerprint"), meta.get("mode")) != (FORMAT, fingerprint, mode):
        if info.is_main:
            print(f"uptrain: {path} belongs to a different configuration or input; starting afresh")
        return None
    mesh = _mesh(model)
    own = _read_rank(path, info.rank, info.device, mesh)
    weights = own if _owns_weights(mode, info) else _read_rank(path, 0, info.device, mesh)
    set_model_state_dict(model, weights["model"], options=SHARDED)
    set_optimizer_state_dict(model, optimizer, weights["optimizer"], options=SHARDED)
    scheduler.load_state_dict(unpack(meta["scheduler"], {}, info.device, None))
    set_rng_state(own["rng"])
    return int(meta["step"]), meta["log"]


def _read_rank(path: Path, rank: int, device: torch.device, mesh: DeviceMesh | None) -> dict[str, Any]:
    return unpack(read_json(path / f"rank{rank}.json"), load_tensors(path / f"rank{rank}.safetensors"), device, mesh)
