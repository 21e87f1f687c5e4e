"""The `puzzle score` stage: run directory in (parent, library, data), `scores/` out, resumable per layer.

The algorithm is `puzzle.stages.scoring.score`; this module reads the inputs, resumes finished layers and
writes scores.json and scores.csv.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzle.core.artifacts import (
    fingerprint_files,
    hash_json,
    hash_paths,
    mark_stage_done,
    read_json,
    stage_is_current,
    write_json,
    write_text,
)
from puzzle.core.config import check_device, to_dict
from puzzle.core.dtypes import DTYPE_BYTES, torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.stages.data import load_tokens
from puzzle.stages.evaluate.long_context import LongContextConfig
from puzzle.stages.evaluate.long_context_eval import prepare_items
from puzzle.stages.library.provider import library_provider
from puzzle.stages.library.store import Library
from puzzle.stages.scoring.batches import TaskItem, lm_batches, load_task_file, task_batches
from puzzle.stages.scoring.score import LOWER_IS_BETTER, METRICS, score_model


@dataclass
class ScoreConfig:
    num_sequences: int = 64  # held-out sequences from data/valid (all of them if fewer)
    batch_size: int = 8  # sequences per batch
    candidates_per_batch: int = 4  # candidates stacked along the batch dimension in one pass over layers i..L
    device: str = "auto"  # auto = cuda if available
    dtype: str = "float32"  # float32 | bfloat16 | float16
    task_file: str | None = None  # optional JSONL of {"context", "choices", "gold"}
    max_task_items: int = 200
    # Long-context items as the `long_context` metric (search.metric: long_context); None = off. Every item runs
    # through layers i..L for every candidate, so keep items and lengths small (e.g. items: 5).
    long_context: LongContextConfig | None = None

    def __post_init__(self) -> None:
        for name in ("num_sequences", "batch_size", "candidates_per_batch", "max_task_items"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"score.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise PuzzleError(f"score.dtype={self.dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
        check_device("score.device", self.device)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PuzzleError(f"score.device={name} but no CUDA GPU is visible; use score.device=cpu")
    return torch.device(name)


def _resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_BYTES:
        raise PuzzleError(f"score.dtype={name!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
    return torch_dtype(name)


def _inputs_hash(run: RunDir, cfg: ScoreConfig) -> str:
    # Small manifests are hashed; weight files are fingerprinted by size and mtime (hashing 140 GB is slow).
    manifests = [run.library_index, run.data_manifest]
    if cfg.task_file:
        manifests.append(Path(cfg.task_file))
    return hash_json({"files": hash_paths([p for p in manifests if p.exists()]),
                      "parent": fingerprint_files(run.parent, recursive=True), "config": to_dict(cfg)})


def run_score(run_dir: Path, cfg: ScoreConfig) -> Path:
    """Score every library candidate of every layer; writes scores/scores.json and scores/scores.csv."""
    run = RunDir(run_dir)
    out_dir = run.scores
    for need, path in (("parent", run.parent), ("library", run.library), ("data", run.data)):
        if not path.exists():
            raise PuzzleError(f"{path} does not exist; run `puzzle {need if need != 'parent' else 'import'}` "
                              f"on {run.root} first")
    inputs_hash = _inputs_hash(run, cfg)
    if stage_is_current(out_dir, inputs_hash) and run.scores_file.exists():
        return run.scores_file

    parent = scoring_parent(run, cfg)
    library = Library.open(run.library)
    tokens, batches, items = score_batches(run, cfg, parent)

    # Resume: finished layers are kept as per-layer files stamped with the inputs hash.
    layer_dir = out_dir / "layers"
    done: dict[int, list[dict[str, Any]]] = {}
    for i in range(parent.config.num_layers):
        path = layer_dir / f"layer_{i:04d}.json"
        if path.exists():
            saved = read_json(path)
            if saved.get("inputs_hash") == inputs_hash:
                done[i] = saved["candidates"]
    todo = {i: library.candidates(i) for i in range(parent.config.num_layers) if i not in done}

    def save_layer(i: int, rows: list[dict[str, Any]]) -> None:
        write_json(layer_dir / f"layer_{i:04d}.json", {"layer": i, "inputs_hash": inputs_hash, "candidates": rows})

    result = score_model(parent, todo, library_provider(library, parent), batches, items or None,
                         cfg.candidates_per_batch, on_layer=save_layer, progress=True)
    layers = {**done, **result.layers}
    scores = {
        "metric_default": "kl",
        "metrics": list(METRICS),
        "lower_is_better": LOWER_IS_BETTER,
        "num_sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "num_task_items": sum(it.metric == "task_accuracy" for it in items),
        "num_long_context_items": sum(it.metric == "long_context" for it in items),
        "parent": result.parent,
        "parent_blocks": [b.to_dict() for b in parent.config.blocks],
        "layers": [{"layer": i, "candidates": layers[i]} for i in sorted(layers)],
        "config": to_dict(cfg),
    }
    write_json(run.scores_file, scores)
    write_text(out_dir / "scores.csv", scores_csv(scores))
    mark_stage_done(out_dir, "score", inputs_hash)
    return run.scores_file


def scoring_parent(run: RunDir, cfg: ScoreConfig) -> Any:
    """The parent on score.device in score.dtype (a PuzzleModel)."""
    return load_model(run.parent, device=str(_resolve_device(cfg.device)), dtype=_resolve_dtype(cfg.dtype))


def score_batches(run: RunDir, cfg: ScoreConfig, parent: Any) -> tuple[torch.Tensor, list[Any], list[TaskItem]]:
    """(held-out tokens [N, T], the batches every candidate is scored on, the task items) as `run_score` builds
    them; the refine stage re-scores on the same ones."""
    valid = load_tokens(run.data, "valid")  # read-only memmap [N, T]
    tokens = torch.from_numpy(np.array(valid[: cfg.num_sequences], dtype=np.int64))
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise PuzzleError(f"{run.data} has no validation sequences; rerun `puzzle data` with a valid split")
    batches = lm_batches(tokens, cfg.batch_size)
    items: list[TaskItem] = []
    if cfg.task_file or cfg.long_context is not None:
        tok = load_tokenizer(run.parent)
    if cfg.task_file:
        items += load_task_file(cfg.task_file, tok.encode, tok.bos_id, cfg.max_task_items)
    if cfg.long_context is not None:
        haystack = load_tokens(run.data, cfg.long_context.haystack_split("score"))  # the test split stays unseen
        items += long_context_task_items(cfg.long_context, haystack, tok, parent.config.max_position_embeddings)
    if items:
        batches += task_batches(items, cfg.batch_size, parent.config.max_position_embeddings)
    return tokens, batches, items


def long_context_task_items(cfg: LongContextConfig, tokens: np.ndarray, tokenizer: Any, max_len: int) -> list[TaskItem]:
    """Long-context items as one-choice task rows, scored by teacher-forced greedy match (the `long_context` metric)."""
    per_task = prepare_items(cfg, tokens, tokenizer, max_len, where="score.long_context")
    return [TaskItem(it.context, [it.answer], 0, "long_context")
            for by_length in per_task.values() for group in by_length.values() for it in group]


def scores_csv(scores: dict[str, Any]) -> str:
    """One row per (layer, candidate), and a first row with the parent's own values (layer = 'parent')."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["layer", "candidate", *METRICS])
    writer.writerow(["parent", "parent", *[scores["parent"].get(m) for m in METRICS]])
    for layer in scores["layers"]:
        for row in layer["candidates"]:
            writer.writerow([layer["layer"], row["name"], *[row.get(m) for m in METRICS]])
    return buf.getvalue()
