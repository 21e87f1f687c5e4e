"""Turn a config plus a state dict (our key names) into a PuzzleModel, checking every key and shape."""

from __future__ import annotations

import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import PuzzleModel, RotaryEmbedding, build_model


def _common_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    for t in state.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def model_from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], source: str,
                          device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PuzzleModel:
    """Build on meta (no random init, no double memory), then assign the checkpoint's tensors.

    dtype None keeps the checkpoint's floating dtype. Missing, unexpected or mis-shaped weights are errors.
    """
    model = build_model(config, device="meta")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise PuzzleError(
            f"{source}: weights do not match its config ({'; '.join(parts)}); the config or weights are wrong"
        )
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise PuzzleError(
                f"{source}: weight {k} has shape {tuple(state[k].shape)} but the config implies "
                f"{tuple(ref.shape)}; the config and weights disagree"
            )
    dtype = dtype or _common_float_dtype(state)
    ready = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in state.items()}
    model.load_state_dict(ready, assign=True, strict=True)
    model.rotary = RotaryEmbedding(config)  # built on meta above; its tables must be real
    return model.eval()
