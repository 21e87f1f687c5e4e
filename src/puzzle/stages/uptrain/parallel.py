"""Apply data parallelism to a single-device model from outside: none, DDP, or FSDP2 (`fully_shard` per layer).

The model code never knows about parallelism (DESIGN: torchtitan's habit). State dicts go through
`torch.distributed.checkpoint.state_dict`, which handles plain modules, DDP and FSDP2 alike (training
checkpoints: puzzle.stages.uptrain.checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from puzzle.core.distributed import DistInfo

Mode = Literal["none", "ddp", "fsdp"]


def choose_mode(requested: str, info: DistInfo, num_params: int, fsdp_min_params: int) -> Mode:
    """'auto': plain on one process; FSDP2 when the model is large, else DDP."""
    if info.world_size == 1:
        return "none"  # one process: nothing to shard or synchronise, whatever was asked
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "fsdp" if num_params >= fsdp_min_params else "ddp"


def shard_model(model: nn.Module, mode: Mode, device: torch.device, trainable: bool) -> nn.Module:
    """Place `model` for `mode`; returns the module to call (the DDP wrapper, or the model itself)."""
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer, then the root (embeddings, final norm, head). fully_shard moves
        # each shard to the mesh's device itself, so a 70B model never sits whole on one GPU.
        for layer in model.layers:  # type: ignore[attr-defined]
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        return model
    model.to(device)
    if mode == "ddp" and trainable:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, model: nn.Module, mode: Mode, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if mode == "ddp" and not sync:
        with wrapped.no_sync():  # type: ignore[operator]
            yield
    elif mode == "fsdp":
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield
    else:
        yield


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (a collective under FSDP: every rank must call it)."""
    # Function-level: torch.distributed.checkpoint costs ~1 s to import (see uptrain.train_gkd).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
