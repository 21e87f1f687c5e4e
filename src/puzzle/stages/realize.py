"""`puzzle realize`: assemble a chosen child from library weights and write it as a Nemotron-NAS HF directory.

Each layer's sub-blocks come from the library (`Library.block`, decoupled or coupled); the embeddings, final
norm and LM head are the parent's. The child is cast to the parent's dtype (bit-exact when the library was
stored in that dtype). Output: `children/<name>/` via `puzzle.formats.export.export_model_dir`, whose `puzzle.json`
sidecar also names the parent, the solution, its predicted costs and its scores. A child with an FFN kind that
has no Nemotron-NAS mapping (`puzzle.model.kinds`) is written in the native format instead (same sidecar), with
a kept warning naming its layers and kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.core.artifacts import (
    fingerprint_files,
    hash_json,
    hash_paths,
    mark_stage_done,
    read_json,
    stage_is_current,
)
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import warn
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model
from puzzle.formats.export import export_model_dir
from puzzle.formats.nemotron_nas import nemotron_ffn_missing
from puzzle.formats.tokenizers import has_tokenizer, load_tokenizer
from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.library.provider import library_provider, refined_provider
from puzzle.stages.library.store import Library
from puzzle.stages.refine.outputs import refined_solutions


@dataclass
class RealizeConfig:
    solutions: list[str] = field(default_factory=list)  # names in search/solutions.json; empty = best per target
    max_children: int = 3

    def __post_init__(self) -> None:
        if self.max_children < 1:
            raise PuzzleError(f"realize.max_children must be at least 1, got {self.max_children}")


def solutions_file(run_dir: Path | RunDir, refined: bool = False) -> Path:
    """search/solutions.json, or with `refined` (refine.enabled) refine/solutions.json, checked to be current."""
    return refined_solutions(run_dir) if refined else RunDir(run_dir).solutions


def chosen_solutions(run_dir: Path | RunDir, cfg: RealizeConfig, refined: bool = False) -> list[str]:
    """The solutions to realize: the configured names, else the best MIP solution of each target."""
    solutions = read_json(solutions_file(run_dir, refined))["solutions"]
    if cfg.solutions:
        return list(cfg.solutions)
    best = [s["name"] for s in solutions if s.get("rank", 0) == 0]
    return best[: cfg.max_children]


def build_child(parent: PuzzleModel, library: Any, blocks: list[BlockConfig], refined: Any = None) -> PuzzleModel:
    """The child, built *in place* from `parent` (so a 70B parent is never held twice): the parent's
    embeddings / final norm / LM head, and per layer the library's sub-blocks (the parent's own where
    the library has no entry for the parent's variant); `refined` (the refine stage's `Library`) first where it
    holds the layer's block."""
    if len(blocks) != parent.config.num_layers:
        raise PuzzleError(f"the solution has {len(blocks)} layers but the parent has {parent.config.num_layers}; "
                          "rerun `puzzle score` and `puzzle search` for this parent")
    p0 = next(parent.parameters())
    provide = library_provider(library, parent) if refined is None else refined_provider(refined, library, parent)
    for i, block in enumerate(blocks):
        att, ffn = provide(i, block)  # reads layer i before it is replaced
        parent.set_layer(i, *(m.to(device=p0.device, dtype=p0.dtype) if m is not None else None for m in (att, ffn)))
    if parent.block_configs != list(blocks):
        raise PuzzleError("the library's blocks do not match the solution; rebuild the library and rerun search")
    return parent.eval()


def find_solution(solutions: dict[str, Any], name: str) -> dict[str, Any]:
    for sol in solutions.get("solutions", []):
        if sol["name"] == name:
            return sol
    names = [s["name"] for s in solutions.get("solutions", [])]
    raise PuzzleError(f"no solution named {name!r} in search/solutions.json; choose one of {names}")


def run_realize(run_dir: Path | RunDir, solution_name: str, refined: bool = False) -> Path:
    """Write children/<solution_name>/ (does nothing when it is current); `refined` (refine.enabled): the
    solution from refine/solutions.json, built with the refine stage's coupled blocks where it has them."""
    run = RunDir(run_dir)
    solutions_path = solutions_file(run, refined)
    if not solutions_path.exists():
        raise PuzzleError(f"{solutions_path} does not exist; run `puzzle search {run.root}` first")
    solution = find_solution(read_json(solutions_path), solution_name)
    out_dir = run.child(solution_name)
    inputs_hash = hash_json({"solution": solution, "library": hash_paths([run.library_index]),
                             "parent": fingerprint_files(run.parent, recursive=True),
                             **({"refined": hash_paths([run.refine_library / RunDir.LIBRARY_INDEX])} if refined else {})})
    if stage_is_current(out_dir, inputs_hash) and RunDir.model_config(out_dir).exists():
        return out_dir
    parent = load_model(run.parent)
    library = Library.open(run.library)
    coupled = Library.open(run.refine_library) if refined else None
    child = build_child(parent, library, [BlockConfig.from_dict(b) for b in solution["blocks"]], coupled)
    # A tokenizer that is there but does not load is an error; a parent with none (e.g. random weights) gives
    # a child with none, and the run says so.
    tokenizer = load_tokenizer(run.parent) if has_tokenizer(run.parent) else None
    if tokenizer is None:
        warn(run.root, "realize", f"the parent has no tokenizer, so {out_dir} is written without one; to ship one, "
                                 "add tokenizer files to the parent model and rerun `puzzle import`")
    sidecar = {
        "parent": str(run.parent.resolve()),
        "parent_config": parent.config.to_dict(),
        "solution": {k: solution[k] for k in ("name", "target", "rank", "optimal") if k in solution},
        "metric": read_json(solutions_path).get("metric"),
        "objective": solution.get("objective"),
        "scores": solution.get("scores"),
        "predicted": solution.get("predicted"),
        "blocks": solution["blocks"],
        **({"refined_layers": solution.get("refined_layers", [])} if refined else {}),
    }
    missing = nemotron_ffn_missing(child.block_configs)
    if missing:
        named = ", ".join(f"layer {i}: {kind}" for i, kind in missing.items())
        warn(run.root, "realize", f"{out_dir} is written in the native format, not as a Nemotron-NAS HF directory: "
                                  f"these FFN kinds have no Nemotron-NAS mapping ({named})")
    export_model_dir(child, out_dir, tokenizer_source=tokenizer, extra_sidecar={"puzzle_child": sidecar})
    mark_stage_done(out_dir, "realize", inputs_hash, solution=solution_name)
    return out_dir
