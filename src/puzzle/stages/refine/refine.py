"""Coupled refinement of the chosen blocks, as in the Puzzle paper (arXiv 2411.19146): after decoupled BLD and a
first search, every (layer, block) some solution chose is trained again as one block against the parent layer's
output, starting from the trained decoupled halves, then re-scored, and the search runs again on those scores.

Coupling changes nothing, so nothing is trained, for: the parent's own block; a block with the parent's attention
(decoupled BLD trained its FFN on exactly the parent's attention output); no_op + no_op (no weights); a block the
library already trained coupled (library.search_space.mode: coupled).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.library.provider import library_provider
from puzzle.stages.library.store import Library, LibraryEntry
from puzzle.stages.library.train import WarmStart

DECOUPLED_KEYS = ("blocks", "block_names", "objective", "scores", "predicted")  # kept from the first search


def needs_coupling(layer: int, block: BlockConfig, parent: BlockConfig, library: Library) -> bool:
    if block == parent or block.attention == parent.attention:
        return False
    if block.attention.kind == "no_op" and block.ffn.kind == "no_op":
        return False
    return not library.has(layer, "block", block.name)


def refine_items(solutions: dict[str, Any], parent_blocks: list[BlockConfig], library: Library) -> list[LibraryEntry]:
    """One coupled library item per (layer, block) chosen by any solution and changed by coupling, in layer order."""
    chosen: dict[int, list[BlockConfig]] = {}
    for sol in solutions.get("solutions", []):
        blocks = [BlockConfig.from_dict(b) for b in sol["blocks"]]
        if len(blocks) != len(parent_blocks):
            raise PuzzleError(f"solution {sol.get('name')!r} has {len(blocks)} layers but the scores have "
                              f"{len(parent_blocks)}; rerun `puzzle search` before `puzzle refine`")
        for i, b in enumerate(blocks):
            chosen.setdefault(i, []).append(b)
    return [LibraryEntry(i, "block", b.attention, b.ffn, None)
            for i in sorted(chosen) for b in dict.fromkeys(chosen[i])
            if needs_coupling(i, b, parent_blocks[i], library)]


def decoupled_warm_start(library: Library) -> Callable[[PuzzleModel], WarmStart]:
    """For `build_library`: each coupled item starts from the decoupled library's attention and FFN entries (the
    parent's own sub-block where the library holds none for the parent's variant), i.e. from exactly the block
    the first search scored."""

    def make(parent: PuzzleModel) -> WarmStart:
        provide = library_provider(library, parent)
        return lambda item: provide(item.layer, BlockConfig(item.attention, item.ffn))

    return make


def merge_scores(scores: dict[str, Any], rescored: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """scores.json with each re-scored (layer, block) row replaced; the row keeps its old metrics as `decoupled`."""
    out = copy.deepcopy(scores)
    replaced = 0
    for entry in out["layers"]:
        new = {row["name"]: row for row in rescored.get(entry["layer"], [])}
        for k, row in enumerate(entry["candidates"]):
            if row["name"] in new:
                old = {m: v for m, v in row.items() if m not in ("block", "name")}
                entry["candidates"][k] = {**new[row["name"]], "refined": True, "decoupled": old}
                replaced += 1
    missing = sum(len(rows) for rows in rescored.values()) - replaced
    if missing:
        raise PuzzleError(f"{missing} re-scored block(s) are not candidates in scores/scores.json; rerun "
                          "`puzzle score` and `puzzle search` before `puzzle refine`")
    out["refined_rows"] = replaced
    return out


def annotate(result: dict[str, Any], decoupled: dict[str, Any], refined: set[tuple[int, str]]) -> dict[str, Any]:
    """Each re-searched solution gets the first search's same-named solution under `decoupled`, and the layers
    whose block is a refined coupled entry under `refined_layers`."""
    by_name = {s["name"]: s for s in decoupled.get("solutions", [])}
    for sol in result["solutions"]:
        sol["refined_layers"] = [i for i, name in enumerate(sol["block_names"]) if (i, name) in refined]
        if sol["name"] in by_name:
            sol["decoupled"] = {k: by_name[sol["name"]].get(k) for k in DECOUPLED_KEYS}
    return result
