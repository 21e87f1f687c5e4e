"""Replace-1-block scoring: the parent with exactly one block swapped for a candidate vs the unchanged parent.

For every layer i and every candidate (attention, FFN) pair, on held-out tokens:
  kl            mean per-token KL(parent || candidate) over every position (the paper's default objective)
  lm_loss       mean next-token cross-entropy of the modified model; lm_loss_delta = lm_loss - parent's
  top1          fraction of positions where the modified model's argmax equals the parent's argmax
  top5          fraction of positions where the parent's argmax is in the modified model's top 5
  task_accuracy multiple-choice accuracy (optional task file; a choice is scored by its summed log-prob)
  long_context  fraction of long-context items (`puzzle.stages.evaluate.long_context`; optional) whose answer
                the model reproduces token by token (teacher-forced greedy match)

Efficiency: the parent's hidden state entering layer i is computed once per batch (the states are advanced
layer by layer, so the parent runs once in total); only layers i..L are re-run per candidate, and several
candidates run together stacked along the batch dimension.

`score_model` takes the parent and a `BlockProvider` callable, so tests can score in-memory blocks;
`puzzle.stages.scoring.stage.run_score` reads the run directory (parent, library, data) and writes `scores/`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import DecoderLayer, PuzzleModel
from puzzle.stages.evaluate.tasks import target_logprobs
from puzzle.stages.library.provider import BlockProvider
from puzzle.stages.scoring.batches import EvalBatch, TaskItem

METRICS = ("kl", "lm_loss", "lm_loss_delta", "top1", "top5", "task_accuracy", "long_context")
# Lower is better for these; higher is better for the agreement and accuracy metrics.
LOWER_IS_BETTER = {"kl": True, "lm_loss": True, "lm_loss_delta": True, "top1": False, "top5": False,
                   "task_accuracy": False, "long_context": False}


@dataclass
class _Sums:
    kl: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    positions: int = 0
    nll: float = 0.0
    nll_tokens: int = 0
    choice_logp: dict[tuple[int, int], float] = field(default_factory=dict)
    choice_greedy: dict[tuple[int, int], bool] = field(default_factory=dict)  # every choice token is the argmax

    def finish(self, items: list[TaskItem] | None, parent_loss: float | None) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            "kl": self.kl / max(self.positions, 1),
            "lm_loss": self.nll / max(self.nll_tokens, 1),
            "top1": self.top1 / max(self.positions, 1),
            "top5": self.top5 / max(self.positions, 1),
            "task_accuracy": None,
            "long_context": None,
        }
        out["lm_loss_delta"] = out["lm_loss"] - parent_loss if parent_loss is not None else 0.0
        mc = [i for i, item in enumerate(items or []) if item.metric == "task_accuracy"]
        if mc:
            correct = 0
            for i in mc:
                logps = [self.choice_logp[(i, j)] for j in range(len(items[i].choices))]  # type: ignore[index]
                correct += int(np.argmax(logps)) == items[i].gold  # type: ignore[index]
            out["task_accuracy"] = correct / len(mc)
        long = [i for i, item in enumerate(items or []) if item.metric == "long_context"]
        if long:
            out["long_context"] = sum(self.choice_greedy[(i, items[i].gold)] for i in long) / len(long)  # type: ignore[index]
        return out


@dataclass
class _ParentRef:
    """What the parent predicts on one batch; the head is re-applied to `final` to get log-probs."""

    final: torch.Tensor  # [B, T, H] parent hidden state after the last layer
    top1: torch.Tensor  # [B, T]


def _accumulate(sums: _Sums, logits: torch.Tensor, batch: EvalBatch, parent_logp: torch.Tensor | None,
                parent_top1: torch.Tensor) -> None:
    """logits [B, T, V] of one model on one batch -> add to `sums`."""
    if batch.task_targets is not None:
        targets = batch.task_targets.to(logits.device)
        mask = targets >= 0  # [B, T]: only these positions are scored (long-context rows are mostly context)
        row, pos = mask.nonzero().unbind(1)  # [N] each: where the scored positions are
        logp_sum, greedy = target_logprobs(logits, row, pos, targets[mask])
        # one copy to the host per batch, not one per row (each copy waits for the GPU)
        for key, value, solved in zip(batch.task_rows, logp_sum.tolist(), greedy.tolist(), strict=True):
            sums.choice_logp[key] = float(value)
            sums.choice_greedy[key] = bool(solved)
        return
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    tokens = batch.tokens.to(logp.device)
    k = min(5, logp.shape[-1])
    kl = F.kl_div(logp, parent_logp, log_target=True, reduction="sum") if parent_logp is not None else None
    values = torch.stack([
        kl if kl is not None else logp.new_zeros(()),
        (logp.argmax(-1) == parent_top1).sum().float(),
        (logp.topk(k, dim=-1).indices == parent_top1[..., None]).any(-1).sum().float(),
        F.nll_loss(logp[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"),
    ]).tolist()  # one copy to the host for the four sums
    sums.kl += values[0]
    sums.top1 += values[1]
    sums.top5 += values[2]
    sums.positions += parent_top1.numel()
    sums.nll += values[3]
    sums.nll_tokens += tokens[:, 1:].numel()


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
