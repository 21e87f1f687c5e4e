"""`search.serve_with`: keep, per layer, only the candidates every named engine serves (`puzzle.formats.engines`).

The library still trains and scores every variant; the MIP simply never sees the others. Whole-model limits (q/k/v
bias) are checked against the parent; a layer left with no candidate is an error naming the layer and the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from puzzle.core.errors import PuzzleError
from puzzle.formats.engines import block_problem, model_problem
from puzzle.formats.loading import load_model_config
from puzzle.model.blocks import BlockConfig, ModelConfig


def servable_mask(candidates: list[list[BlockConfig]], engines: list[str]) -> list[np.ndarray]:
    """Per layer, a boolean mask over its candidates: True where every engine serves the block at that layer."""
    n = len(candidates)
    masks = []
    for i, layer in enumerate(candidates):
        keep = np.array([all(block_problem(e, b, i, n) is None for e in engines) for b in layer], dtype=bool)
        if not keep.any():
            reasons = sorted({f"{e}: {block_problem(e, b, i, n)}" for b in layer for e in engines
                              if block_problem(e, b, i, n)})
            raise PuzzleError(f"search.serve_with: no candidate of layer {i} can be served ({'; '.join(reasons)}); "
                              "add a variant those engines serve to library.search_space, or drop the engine")
        masks.append(keep)
    return masks


def check_parent(parent: ModelConfig | None, engines: list[str]) -> None:
    """Whole-model limits: a parent with q/k/v bias gives children no vLLM/SGLang/TRT-LLM can serve."""
    if parent is None:
        return
    for engine in engines:
        why = model_problem(engine, parent)
        if why == "q/k/v bias":
            raise PuzzleError(f"search.serve_with: {engine} cannot serve any child of this parent (its q/k/v bias); "
                              f"drop {engine} from search.serve_with")


def parent_config(parent_dir: Path) -> ModelConfig | None:
    """The parent's config when the run has imported it (tests may search on scores alone)."""
    return load_model_config(parent_dir) if parent_dir.exists() else None
