"""The FFN kinds: one registry that every stage asks about a kind, and the built-in kinds registered through it.

A kind is an `FFNKindSpec`; `register_ffn_kind(spec)` makes it usable everywhere:
  - `FFNConfig(kind, size)` validates against it, names the variant (`name` + size, e.g. 'relu2128') and counts
    its parameters (`puzzle.model.blocks`);
  - the decoder builds `spec.build(hidden_size, size)`, an nn.Module [B, T, H] -> [B, T, H] behind the
    sub-block's RMSNorm (`puzzle.model.decoder.FFNBlock`; its weights live under `ffn.op.`);
  - the library initialises a variant with `spec.init(parent_block, child_block)` (optional: without it the
    module keeps its own initialisation; either way BLD then trains it on the parent's activations), and the
    search space offers it through `library.search_space.ffn_variants: ["relu2128"]`
    (`puzzle.stages.library.search_space.parse_ffn` parses names through this registry);
  - costs in estimate mode use `spec.flops_per_token(hidden, size)` (default: 2 x its parameters) and the
    parameter bytes against the roofline (`puzzle.costs.estimate`); measured costs time the module itself;
  - the runtime calls the module (the eager path) unless the kind has a fused kernel there
    (`puzzle.runtime.subblocks`: SwiGLU and linear do);
  - `spec.nemotron(ffn, hidden_size)` gives the Nemotron-NAS `block_configs` "ffn" entry. A kind without one
    cannot be written as a Nemotron-NAS (DeciLM) checkpoint: `puzzle realize` (and uptrain) then write the child
    in the native format (`puzzle.formats.export.export_model_dir`; it loads with `puzzle.formats.load_model`),
    and realize keeps a warning naming the layers and kinds; `export_hf` raises.

Adding a kind: define the module and a spec, call `register_ffn_kind(spec)` before the run's stages read any
config (e.g. in a plugin module imported first; tests register in a fixture and `unregister_ffn_kind` after).
Attention kinds could follow the same pattern; they are still fixed in `puzzle.model.blocks`.
This module imports no torch (the search side of costs and search reads FFN configs without it); the built-in
modules are `puzzle.model.decoder.SwiGLU` and `LinearFFN`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from puzzle.core.errors import PuzzleError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FFNKindSpec:
    """One FFN kind. `size` below is the variant's intermediate size (None for kinds that take none).

    name: the kind's name, also the variant name's prefix ('swiglu' -> 'swiglu768').
    sized: whether a variant takes a positive `intermediate_size`.
    param_count(hidden, size): parameters of the module (the sub-block's norm is counted apart).
    build(hidden, size): the nn.Module [B, T, H] -> [B, T, H]; None for a kind that owns no module (no_op).
    init(parent_block, child_block): optional, initialises the child's FFNBlock from the parent's (fp32, under
      torch.no_grad; the norm is already the parent's). The built-in kinds use calibration statistics instead
      (`puzzle.stages.library.init`).
    init_name: how the library index names that initialisation.
    flops_per_token(hidden, size): optional; default 2 x (param_count + hidden).
    nemotron(ffn, hidden): optional, the Nemotron-NAS block_configs "ffn" entry of a variant.
    """

    name: str
    sized: bool
    param_count: Callable[[int, int | None], int]
    build: Callable[[int, int | None], nn.Module] | None
    init: Callable[[Any, Any], None] | None = None
    init_name: str = "module_init"
    flops_per_token: Callable[[int, int | None], float] | None = None
    nemotron: Callable[[Any, int], dict[str, Any]] | None = None

    @property
    def has_module(self) -> bool:
        return self.build is not None


_FFN_KINDS: dict[str, FFNKindSpec] = {}
_BUILTIN = ("swiglu", "linear", "no_op")


def register_ffn_kind(spec: FFNKindSpec) -> FFNKindSpec:
    """Make `spec` usable everywhere (see the module docstring). Names must be new identifiers without digits."""
    if not spec.name.isidentifier() or any(c.isdigit() for c in spec.name):
        raise PuzzleError(f"FFN kind name {spec.name!r} must be an identifier without digits (sizes follow it)")
    if spec.name in _FFN_KINDS:
        raise PuzzleError(f"FFN kind {spec.name!r} is already registered")
    _FFN_KINDS[spec.name] = spec
    return spec


def unregister_ffn_kind(name: str) -> None:
    """Forget a registered kind (the built-in kinds stay)."""
    if name in _BUILTIN:
        raise PuzzleError(f"the built-in FFN kind {name!r} cannot be unregistered")
    _FFN_KINDS.pop(name, None)


def ffn_kinds() -> dict[str, FFNKindSpec]:
    """The registered kinds by name, built-in first."""
    return dict(_FFN_KINDS)


def ffn_kind(name: str) -> FFNKindSpec:
    spec = _FFN_KINDS.get(name) if isinstance(name, str) else None
    if spec is None:
        names = [repr(n) for n in _FFN_KINDS]
        raise PuzzleError(f"unknown ffn kind {name!r}; use {', '.join(names[:-1])} or {names[-1]}")
    return spec


def _swiglu_nemotron(ffn: Any, hidden: int) -> dict[str, Any]:
    return {"no_op": False, "replace_with_linear": False, "sparsify": None,
            "ffn_mult": intermediate_size_to_ffn_mult(ffn.intermediate_size, hidden), "intermediate_size": ffn.intermediate_size}


def _flag_nemotron(no_op: bool, linear: bool) -> Callable[[Any, int], dict[str, Any]]:
    return lambda ffn, hidden: {"no_op": no_op, "replace_with_linear": linear, "sparsify": None,
                                "ffn_mult": None, "intermediate_size": None}


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float:
    """The ffn_mult that DeciLM maps back to `intermediate_size` when it is a multiple of 256."""
    mult = round(1.5 * intermediate_size / hidden_size, 6)
    # Rounding to 6 digits may land a hair under the exact value; nudge up until the mapping agrees.
    while intermediate_size % 256 == 0 and ffn_mult_to_intermediate_size(mult, hidden_size) < intermediate_size:
        mult = round(mult + 1e-6, 6)
    return mult


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule (also vLLM's): int(2 * mult * hidden / 3) rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - (n % 256)


def _build_swiglu(hidden: int, size: int | None) -> nn.Module:
    # Imported when a module is built: this registry stays torch-free, for the search side of costs and search.
    from puzzle.model.decoder import SwiGLU

    return SwiGLU(hidden, size)


def _build_linear(hidden: int, size: int | None) -> nn.Module:
    from puzzle.model.decoder import LinearFFN  # torch-free registry, as above

    return LinearFFN(hidden)


register_ffn_kind(FFNKindSpec("swiglu", sized=True, param_count=lambda h, i: 3 * h * i,
                              build=_build_swiglu, init_name="channel_contribution",
                              nemotron=_swiglu_nemotron))
register_ffn_kind(FFNKindSpec("linear", sized=False, param_count=lambda h, i: h * h,
                              build=_build_linear, init_name="ridge_lstsq",
                              nemotron=_flag_nemotron(False, True)))
register_ffn_kind(FFNKindSpec("no_op", sized=False, param_count=lambda h, i: 0, build=None, init_name="none",
                              nemotron=_flag_nemotron(True, False)))
