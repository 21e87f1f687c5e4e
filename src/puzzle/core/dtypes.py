"""Weight dtypes by name: the bytes per element (torch-free, for the search and the memory model) and the
torch dtype (for building models). The one table of them; every config field naming a dtype checks it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from puzzle.core.errors import PuzzleError

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # canonical names (torch's), bytes per element
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(name: str, field: str = "dtype") -> str:
    """The canonical name of `name` ("bf16", "torch.bfloat16" and "bfloat16" all give "bfloat16")."""
    key = str(name).removeprefix("torch.")
    key = ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        names = ", ".join(f"{k} ({a})" for a, k in ALIASES.items())
        raise PuzzleError(f"{field} {name!r} is not supported; use one of {names}")
    return key


def dtype_bytes(name: str, field: str = "dtype") -> int:
    return DTYPE_BYTES[dtype_name(name, field)]


# Deployment precisions (what `costs.dtype` names): every weight dtype, and "fp8" = e4m3 linear weights and
# activations and an e4m3 KV cache (`puzzle.runtime.fp8`), 1 byte per weight and per cached K/V element;
# embeddings, norms and the LM head stay bfloat16. Not a weight dtype: nothing builds a model in "fp8".
FP8 = "fp8"
PRECISION_BYTES = {**DTYPE_BYTES, FP8: 1}
PRECISION_ALIASES = {**ALIASES, "float8": FP8, "float8_e4m3fn": FP8, "e4m3": FP8}


def precision_name(name: str, field: str = "dtype") -> str:
    """The canonical name of a deployment precision ("fp8", "float8_e4m3fn" -> "fp8"; "bf16" -> "bfloat16")."""
    key = str(name).removeprefix("torch.")
    key = PRECISION_ALIASES.get(key, key)
    if key not in PRECISION_BYTES:
        raise PuzzleError(f"{field} {name!r} is not supported; use one of {', '.join(PRECISION_BYTES)}")
    return key


def precision_bytes(name: str, field: str = "dtype") -> int:
    """Bytes per weight and per cached K/V element at a deployment precision."""
    return PRECISION_BYTES[precision_name(name, field)]


def compute_dtype_name(name: str, field: str = "dtype") -> str:
    """The dtype a precision's model is built in (and its activations and norms run in): fp8 -> bfloat16."""
    key = precision_name(name, field)
    return "bfloat16" if key == FP8 else key


def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    # torch is imported here, not above: the search and the memory model read byte sizes without torch
    import torch

    return getattr(torch, dtype_name(name, field))
