"""Replace-1-block scoring: the parent with exactly one block swapped for a candidate vs the unchanged parent.

For every layer i and every candidate (attention, FFN) pair, on held-out tokens:
  kl            mean per-token KL(parent || candidate) over every position (the paper's default objective)
  lm_loss       mean next-token cross-entropy of the modified model; lm_loss_delta = lm_loss - parent's
  top1          fraction of positions where the modified model's argmax equals the parent's argmax
  top5          fraction of positions where the parent's argmax is in the modified model's top 5
  task_accuracy multiple-choice accuracy (optional task file; a choice is scored by its summed log-prob)

Efficiency: the parent's hidden state entering layer i is computed once per batch (the states are advanced
layer by layer, so the parent runs once in total); only layers i..L are re-run per candidate, and several
candidates run together stacked along the batch dimension.

The core (`score_model`) takes the parent and a `BlockProvider` callable, so tests can score in-memory
blocks; `run_score` reads the run directory (parent, library, data) and writes `scores/`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

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
from puzzle.model.blocks import BlockConfig
from puzzle.core.config import check_device, to_dict
from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import AttentionBlock, DecoderLayer, FFNBlock, PuzzleModel

BlockProvider = Callable[[int, BlockConfig], tuple[AttentionBlock | None, FFNBlock | None]]
METRICS = ("kl", "lm_loss", "lm_loss_delta", "top1", "top5", "task_accuracy")
# Lower is better for these; higher is better for the agreement and accuracy metrics.
LOWER_IS_BETTER = {"kl": True, "lm_loss": True, "lm_loss_delta": True, "top1": False, "top5": False,
                   "task_accuracy": False}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ScoreConfig:
    num_sequences: int = 64  # held-out sequences from data/valid (all of them if fewer)
    batch_size: int = 8  # sequences per batch
    candidates_per_batch: int = 4  # candidates stacked along the batch dimension in one pass over layers i..L
    device: str = "auto"  # auto = cuda if available
    dtype: str = "float32"  # float32 | bfloat16 | float16
    task_file: str | None = None  # optional JSONL of {"context", "choices", "gold"}
    max_task_items: int = 200

    def __post_init__(self) -> None:
        for name in ("num_sequences", "batch_size", "candidates_per_batch", "max_task_items"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"score.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in _DTYPES:
            raise PuzzleError(f"score.dtype={self.dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        check_device("score.device", self.device)


# ---- evaluation batches ------------------------------------------------------------------------------------


@dataclass
class TaskItem:
    context: list[int]
    choices: list[list[int]]
    gold: int


@dataclass
class EvalBatch:
    """Token rows plus what to measure on them. LM rows: all positions; task rows: choice tokens only."""

    tokens: torch.Tensor  # [B, T] int64 (task rows right-padded with 0; causal attention ignores the pads)
    task_targets: torch.Tensor | None = None  # [B, T] next-token ids to score, -100 elsewhere (task rows)
    task_rows: list[tuple[int, int]] = field(default_factory=list)  # (item, choice) of each task row


def lm_batches(tokens: torch.Tensor, batch_size: int) -> list[EvalBatch]:
    """tokens [N, T] -> batches of at most `batch_size` sequences."""
    return [EvalBatch(tokens[i:i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]


def task_batches(items: list[TaskItem], batch_size: int, max_len: int) -> list[EvalBatch]:
    """One row per (item, choice): context + choice, truncated from the left to `max_len` tokens."""
    rows: list[tuple[list[int], int, tuple[int, int]]] = []
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            seq = (item.context + choice)[-max_len:]
            rows.append((seq, min(len(choice), len(seq) - 1), (i, j)))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(seq) for seq, _, _ in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (seq, n_choice, _) in enumerate(chunk):
            tokens[r, :len(seq)] = torch.tensor(seq)
            # logits at position t predict token t+1: the last n_choice tokens are the choice.
            first = len(seq) - n_choice
            targets[r, first - 1:len(seq) - 1] = torch.tensor(seq[first:])
        batches.append(EvalBatch(tokens, targets, [row for _, _, row in chunk]))
    return batches


def load_task_file(path: str | Path, encode: Callable[[str], list[int]], bos_id: int | None,
                   max_items: int) -> list[TaskItem]:
    """A multiple-choice task file read by `puzzle.stages.evaluate.tasks` (JSONL {"context", "choices", "gold"} or HellaSwag),
    tokenized as lm-eval does; a badly formed line is named in the error."""
    from puzzle.stages.evaluate.tasks import MultipleChoiceItem, TaskSpec, load_task, split_request

    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"task file {path} does not exist; set score.task_file to a JSONL file or leave it unset")
    items = load_task(TaskSpec(str(path), limit=max_items))
    if not isinstance(items[0], MultipleChoiceItem):
        raise PuzzleError(f"{path} is a last-word task; score.task_file needs a multiple-choice task "
                          '(JSONL {"context": ..., "choices": [...], "gold": i} or HellaSwag)')
    out = []
    for item in items:
        requests = [split_request(encode, item.context, choice, bos_id) for choice in item.choices]
        out.append(TaskItem(requests[0][0], [cont for _, cont in requests], item.gold))
    return out


# ---- metric accumulation -----------------------------------------------------------------------------------


@dataclass
class _Sums:
    kl: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    positions: int = 0
    nll: float = 0.0
    nll_tokens: int = 0
    choice_logp: dict[tuple[int, int], float] = field(default_factory=dict)

    def finish(self, items: list[TaskItem] | None, parent_loss: float | None) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            "kl": self.kl / max(self.positions, 1),
            "lm_loss": self.nll / max(self.nll_tokens, 1),
            "top1": self.top1 / max(self.positions, 1),
            "top5": self.top5 / max(self.positions, 1),
            "task_accuracy": None,
        }
        out["lm_loss_delta"] = out["lm_loss"] - parent_loss if parent_loss is not None else 0.0
        if items:
            correct = 0
            for i, item in enumerate(items):
                logps = [self.choice_logp[(i, j)] for j in range(len(item.choices))]
                correct += int(np.argmax(logps)) == item.gold
            out["task_accuracy"] = correct / len(items)
        return out


@dataclass
class _ParentRef:
    """What the parent predicts on one batch; the head is re-applied to `final` to get log-probs."""

    final: torch.Tensor  # [B, T, H] parent hidden state after the last layer
    top1: torch.Tensor  # [B, T]


def _accumulate(sums: _Sums, logits: torch.Tensor, batch: EvalBatch, parent_logp: torch.Tensor | None,
                parent_top1: torch.Tensor) -> None:
    """logits [B, T, V] of one model on one batch -> add to `sums`."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    if batch.task_targets is not None:
        targets = batch.task_targets.to(logp.device)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets >= 0)  # [B, T]
        for r, key in enumerate(batch.task_rows):
            sums.choice_logp[key] = float(picked[r].sum())
        return
    tokens = batch.tokens.to(logp.device)
    if parent_logp is not None:
        sums.kl += float(F.kl_div(logp, parent_logp, log_target=True, reduction="sum"))
    sums.top1 += float((logp.argmax(-1) == parent_top1).sum())
    k = min(5, logp.shape[-1])
    sums.top5 += float((logp.topk(k, dim=-1).indices == parent_top1[..., None]).any(-1).sum())
    sums.positions += parent_top1.numel()
    sums.nll += float(F.nll_loss(logp[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"))
    sums.nll_tokens += tokens[:, 1:].numel()


# ---- the core ------------------------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    parent: dict[str, float | None]
    layers: dict[int, list[dict[str, Any]]]  # layer -> one row per candidate: block, name and every metric


@torch.no_grad()
def score_model(
    parent: PuzzleModel,
    candidates: dict[int, list[BlockConfig]],
    provider: BlockProvider,
    batches: list[EvalBatch],
    task_items: list[TaskItem] | None = None,
    candidates_per_batch: int = 4,
    on_layer: Callable[[int, list[dict[str, Any]]], None] | None = None,
    progress: bool = False,
) -> ScoreResult:
    """Score every (layer, candidate) in `candidates` (layers absent from it are skipped but still advanced).

    `provider(layer, block)` gives the candidate's sub-blocks (None = no-op); they are moved to the parent's
    device and dtype. `on_layer(layer, rows)` is called when a layer is finished (used for resumable files).
    """
    parent.eval()
    p0 = next(parent.parameters())
    device, dtype = p0.device, p0.dtype
    batches = [EvalBatch(b.tokens.to(device), b.task_targets, b.task_rows) for b in batches]
    rope = [parent.rope(parent.default_positions(b.tokens), dtype) for b in batches]  # cos, sin [B, T, D]
    states = [parent.embed(b.tokens) for b in batches]  # hidden state entering the current layer, [B, T, H]

    # Parent reference: one full pass, keeping only the final hidden state and the argmax per batch.
    refs: list[_ParentRef] = []
    parent_sums = _Sums()
    for b, h, (cos, sin) in zip(batches, states, rope):
        final = parent.run_layers(h, cos, sin)
        logits = parent.head(final)
        refs.append(_ParentRef(final, logits.argmax(-1)))
        _accumulate(parent_sums, logits, b, None, refs[-1].top1)
    parent_values = parent_sums.finish(task_items, None)
    parent_values.update(kl=0.0, top1=1.0, top5=1.0)
    parent_loss = parent_values["lm_loss"]

    result = ScoreResult(parent_values, {})
    layers = range(len(parent.layers))
    for i in tqdm(layers, desc="scoring layers", disable=not progress):
        if candidates.get(i):
            rows = _score_layer(parent, i, candidates[i], provider, batches, rope, states, refs, task_items,
                                parent_loss, candidates_per_batch, device, dtype)
            result.layers[i] = rows
            if on_layer is not None:
                on_layer(i, rows)
        if i + 1 < len(parent.layers) and any(candidates.get(j) for j in range(i + 1, len(parent.layers))):
            states = [parent.layers[i](h, cos, sin) for h, (cos, sin) in zip(states, rope)]
    return result


def _score_layer(parent: PuzzleModel, i: int, blocks: list[BlockConfig], provider: BlockProvider,
                 batches: list[EvalBatch], rope: list[tuple[torch.Tensor, torch.Tensor]],
                 states: list[torch.Tensor], refs: list[_ParentRef], task_items: list[TaskItem] | None,
                 parent_loss: float | None, group_size: int, device: torch.device,
                 dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    for g in range(0, len(blocks), max(group_size, 1)):
        group = blocks[g:g + group_size]
        layers = []
        for block in group:
            att, ffn = provider(i, block)
            layer = DecoderLayer(att, ffn).to(device=device, dtype=dtype).eval()
            if layer.block_config != block:
                raise PuzzleError(f"layer {i}: the library gave {layer.block_config.name} for {block.name}; "
                                  "rebuild the library (puzzle library) and rerun puzzle score")
            layers.append(layer)
        sums = [_Sums() for _ in group]
        for b, h, (cos, sin), ref in zip(batches, states, rope, refs):
            n = h.shape[0]
            # The replaced layer runs per candidate; layers i+1..L run once on all candidates stacked.
            h_cat = torch.cat([layer(h, cos, sin) for layer in layers])  # [c*B, T, H]
            c = len(layers)
            out = parent.run_layers(h_cat, cos.repeat(c, 1, 1), sin.repeat(c, 1, 1), start=i + 1)
            parent_logp = torch.log_softmax(parent.head(ref.final).float(), dim=-1) if b.task_targets is None else None
            for k in range(c):
                _accumulate(sums[k], parent.head(out[k * n:(k + 1) * n]), b, parent_logp, ref.top1)
        for block, s in zip(group, sums):
            rows.append({"block": block.to_dict(), "name": block.name, **s.finish(task_items, parent_loss)})
    return rows


# ---- the stage -------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PuzzleError(f"score.device={name} but no CUDA GPU is visible; use score.device=cpu")
    return torch.device(name)


def _resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise PuzzleError(f"score.dtype={name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def library_provider(library: Any, parent: PuzzleModel) -> BlockProvider:
    """Candidate sub-blocks from the library (`Library.block`, either mode). Where the library holds no entry
    for a sub-block that equals the parent's own variant, the parent's sub-block is used: it *is* that block."""
    config = parent.config

    def provide(layer: int, block: BlockConfig) -> tuple[AttentionBlock | None, FFNBlock | None]:
        own = config.blocks[layer]
        have = {(e.kind, e.variant) for e in library.entries_for(layer)}
        if ("block", block.name) in have:  # a coupled pair
            return library.block(layer, block, config)
        att = parent.layers[layer].attention if block.attention == own.attention and \
            ("attention", block.attention.name) not in have else library.attention_block(layer, block.attention, config)
        ffn = parent.layers[layer].ffn if block.ffn == own.ffn and ("ffn", block.ffn.name) not in have \
            else library.ffn_block(layer, block.ffn, config)
        return att, ffn

    return provide


def _inputs_hash(run_dir: Path, cfg: ScoreConfig) -> str:
    # Small manifests are hashed; weight files are fingerprinted by size and mtime (hashing 140 GB is slow).
    manifests = [run_dir / "library" / "library.json", run_dir / "data" / "manifest.json"]
    if cfg.task_file:
        manifests.append(Path(cfg.task_file))
    return hash_json({"files": hash_paths([p for p in manifests if p.exists()]),
                      "parent": fingerprint_files(run_dir / "parent", recursive=True), "config": to_dict(cfg)})


def run_score(run_dir: Path, cfg: ScoreConfig) -> Path:
    """Score every library candidate of every layer; writes scores/scores.json and scores/scores.csv."""
    from puzzle.formats import load_model
    from puzzle.stages.data import load_tokens
    from puzzle.stages.library.store import Library

    run_dir = Path(run_dir)
    out_dir = run_dir / "scores"
    for need in ("parent", "library", "data"):
        if not (run_dir / need).exists():
            raise PuzzleError(f"{run_dir / need} does not exist; run `puzzle {need if need != 'parent' else 'import'}` "
                              f"on {run_dir} first")
    inputs_hash = _inputs_hash(run_dir, cfg)
    if stage_is_current(out_dir, inputs_hash) and (out_dir / "scores.json").exists():
        return out_dir / "scores.json"

    device, dtype = _resolve_device(cfg.device), _resolve_dtype(cfg.dtype)
    parent = load_model(run_dir / "parent", device=str(device), dtype=dtype)
    library = Library.open(run_dir / "library")
    valid = load_tokens(run_dir / "data", "valid")  # read-only memmap [N, T]
    tokens = torch.from_numpy(np.array(valid[: cfg.num_sequences], dtype=np.int64))
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise PuzzleError(f"{run_dir / 'data'} has no validation sequences; rerun `puzzle data` with a valid split")
    batches = lm_batches(tokens, cfg.batch_size)
    items = None
    if cfg.task_file:
        from puzzle.formats.tokenizers import load_tokenizer

        tok = load_tokenizer(run_dir / "parent")
        items = load_task_file(cfg.task_file, tok.encode, tok.bos_id, cfg.max_task_items)
        batches += task_batches(items, cfg.batch_size, parent.config.max_position_embeddings)

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

    result = score_model(parent, todo, library_provider(library, parent), batches, items,
                         cfg.candidates_per_batch, on_layer=save_layer, progress=True)
    layers = {**done, **result.layers}
    scores = {
        "metric_default": "kl",
        "metrics": list(METRICS),
        "lower_is_better": LOWER_IS_BETTER,
        "num_sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "num_task_items": len(items) if items else 0,
        "parent": result.parent,
        "parent_blocks": [b.to_dict() for b in parent.config.blocks],
        "layers": [{"layer": i, "candidates": layers[i]} for i in sorted(layers)],
        "config": to_dict(cfg),
    }
    write_json(out_dir / "scores.json", scores)
    write_text(out_dir / "scores.csv", scores_csv(scores))
    mark_stage_done(out_dir, "score", inputs_hash)
    return out_dir / "scores.json"


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
