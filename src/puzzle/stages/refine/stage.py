"""`puzzle refine`: the opt-in coupled-BLD refinement (`refine.py`) as a resumable stage.

    reads   search/solutions.json, scores/scores.json, library/ (the decoupled halves), parent/, data/, costs/
    writes  refine/library/   the coupled entries, in the library format (per-entry resume, torchrun rank split)
            refine/layers/    each re-scored layer as soon as it is done (a resumed refine skips it)
            refine/scores.json     scores.json with the refined rows re-scored (their old metrics under `decoupled`)
            refine/solutions.json  the search re-run on them (same constraints and costs; `decoupled` per solution)
`library/` and `scores/` are never modified: the earlier stages stay current. With `refine.enabled: false` (the
default) the stage does nothing and realize reads search/solutions.json as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from puzzle.core.artifacts import (
    hash_file,
    hash_json,
    hash_paths,
    mark_stage_done,
    read_json,
    stage_is_current,
    write_json,
)
from puzzle.core.config import from_dict, to_dict
from puzzle.core.distributed import all_gather_objects, barrier, distributed
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model
from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.data import load_tokens
from puzzle.stages.library import LibraryConfig, build_library
from puzzle.stages.library.provider import refined_provider
from puzzle.stages.library.search_space import SearchSpaceConfig
from puzzle.stages.library.store import Library, LibraryEntry
from puzzle.stages.refine.outputs import source_hash
from puzzle.stages.refine.refine import annotate, decoupled_warm_start, merge_scores, refine_items
from puzzle.stages.scoring.score import score_model
from puzzle.stages.scoring.stage import ScoreConfig, score_batches, scoring_parent
from puzzle.stages.search.solve import load_inputs
from puzzle.stages.search.stage import SearchConfig
from puzzle.stages.search.verify import eval_graphs, verified_search


@dataclass
class RefineConfig:
    enabled: bool = False  # off: the stage writes nothing and realize reads search/solutions.json
    tokens_per_variant: int = 0  # training tokens per coupled block; 0 = library.tokens_per_variant
    lr: float = 0.0  # 0 = library.lr (the other BLD settings are the library's)

    def __post_init__(self) -> None:
        for name in ("tokens_per_variant", "lr"):
            if getattr(self, name) < 0:
                raise PuzzleError(f"refine.{name} must be >= 0 (0 = the library's), got {getattr(self, name)}")


def refine_library_config(cfg: RefineConfig, library: LibraryConfig) -> LibraryConfig:
    return replace(library, tokens_per_variant=cfg.tokens_per_variant or library.tokens_per_variant,
                   lr=cfg.lr or library.lr, search_space=SearchSpaceConfig(mode="coupled"))


def _inputs_hash(run: RunDir, cfg: RefineConfig, library: LibraryConfig, search: SearchConfig, graphs: str) -> str:
    bld = {k: v for k, v in to_dict(refine_library_config(cfg, library)).items()
           if k not in ("progress", "device", "max_params_per_wave", "max_items_per_wave", "log_every")}
    return hash_json({"source": source_hash(run), "costs": hash_paths(run.costs_files()), "data":
                      hash_file(run.data_manifest), "bld": bld, "search": to_dict(search), "graphs": graphs})


def run_refine(run_dir: Path | RunDir, cfg: RefineConfig, library: LibraryConfig, search: SearchConfig,
               graphs: str | None = None, measure: Any = None) -> Path | None:
    """Train, re-score and re-search (every rank trains its share under torchrun; rank 0 scores and searches).
    Returns refine/solutions.json, or None when refine is disabled. `measure` replaces the search's GPU timing."""
    if not cfg.enabled:
        return None
    run = RunDir(run_dir)
    for need, path in (("search", run.solutions), ("score", run.scores_file), ("library", run.library_index)):
        if not path.exists():
            raise PuzzleError(f"refine.enabled is set but {path} does not exist; run `puzzle {need} {run.root}` "
                              "first (or set refine.enabled=false)")
    graphs = graphs or eval_graphs(run.root)
    inputs_hash = _inputs_hash(run, cfg, library, search, graphs)
    if stage_is_current(run.refine, inputs_hash) and run.refine_solutions.exists():
        print(f"refine: {run.refine} is current, nothing to do")
        return run.refine_solutions
    decoupled = Library.open(run.library)
    solutions, scores = read_json(run.solutions), read_json(run.scores_file)
    parent_blocks = [BlockConfig.from_dict(b) for b in scores["parent_blocks"]]
    items = refine_items(solutions, parent_blocks, decoupled)
    with distributed(library.device if library.device != "auto" else None) as info:

        def parent_loader(device: torch.device, dtype: torch.dtype) -> PuzzleModel:
            return load_model(run.parent, device=str(device), dtype=dtype)

        # The entries depend on the parent and data (through the library's train hash) and the decoupled halves.
        bld_inputs = hash_json({"library": hash_file(run.library_index), "data": hash_file(run.data_manifest)})
        build_library(run.refine_library, parent_loader, load_tokens(run.data, "train"),
                      load_tokens(run.data, "valid"), refine_library_config(cfg, library), bld_inputs,
                      items=items, warm_start=decoupled_warm_start(decoupled), stage="refine")
        error = None
        if info.is_main:
            try:
                _rescore_and_search(run, items, decoupled, scores, solutions, search, graphs, measure, inputs_hash)
            except PuzzleError as e:
                error = str(e)
        errors = [e for e in all_gather_objects(error) if e]
        barrier()
        if errors:
            raise PuzzleError(str(errors[0]))
    return run.refine_solutions


def _rescore_and_search(run: RunDir, items: list[LibraryEntry], decoupled: Library, scores: dict[str, Any],
                        solutions: dict[str, Any], search: SearchConfig, graphs: str, measure: Any,
                        inputs_hash: str) -> None:
    score_cfg = from_dict(ScoreConfig, scores.get("config") or {}, where="scores/scores.json config")
    refined = Library.open(run.refine_library)
    layer_hash = hash_json({"decoupled": hash_file(run.library_index), "scores": hash_file(run.scores_file),
                            "coupled": hash_file(run.refine_library / RunDir.LIBRARY_INDEX)})
    todo: dict[int, list[BlockConfig]] = {}
    for it in items:
        todo.setdefault(it.layer, []).append(BlockConfig(it.attention, it.ffn))
    done = {}
    for i in list(todo):
        path = run.refine_score_layer(i)
        if path.exists() and (saved := read_json(path)).get("inputs_hash") == layer_hash:
            done[i] = saved["candidates"]
            del todo[i]
    if todo:
        parent = scoring_parent(run, score_cfg)
        _, batches, task_items = score_batches(run, score_cfg, parent)

        def save_layer(i: int, rows: list[dict[str, Any]]) -> None:
            write_json(run.refine_score_layer(i), {"layer": i, "inputs_hash": layer_hash, "candidates": rows})

        result = score_model(parent, todo, refined_provider(refined, decoupled, parent), batches,
                             task_items or None, score_cfg.candidates_per_batch, on_layer=save_layer, progress=True)
        done.update(result.layers)
    merged = merge_scores(scores, done)
    write_json(run.refine_scores, merged)
    result, _ = verified_search(load_inputs(run, search, run.refine_scores), search, run.root, graphs, measure)
    annotate(result, solutions, {(it.layer, BlockConfig(it.attention, it.ffn).name) for it in items})
    write_json(run.refine_solutions, result)
    mark_stage_done(run.refine, "refine", inputs_hash, source=source_hash(run), refined=len(items))
    print(f"refine: {len(items)} coupled block(s) trained and re-scored; {run.refine_solutions}")
