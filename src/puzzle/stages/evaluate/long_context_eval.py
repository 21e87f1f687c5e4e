"""Scoring the long-context items (`puzzle.stages.evaluate.long_context`): accuracy and retention per (task, length).

An item counts as solved when every answer token is the model's argmax given the context and the answer tokens
before it (teacher-forced greedy match): exactly what greedy decoding would produce for those tokens, at the cost
of one forward pass and without a stopping rule. `token_accuracy` (the fraction of answer tokens that are the
argmax) and `answer_nll` (mean over items of the answer's summed negative log-likelihood) are kept too: they move
before accuracy does, and still say something for a small parent that solves no item. Only the answer positions go through the LM head,
so an 8k-token row costs no 8k x vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from puzzle.model.decoder import PuzzleModel
from puzzle.stages.evaluate.long_context import (
    LongContextConfig,
    LongContextItem,
    haystack_tokens,
    make_items,
    resolve_lengths,
)
from puzzle.stages.report import plots  # matplotlib itself is imported only when a plot is drawn
from puzzle.stages.report.long_context import long_context_plot

TailLogitsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (ids [B, T], k) -> logits of the last k positions [B, k, V]


def model_tail_logits(model: PuzzleModel) -> TailLogitsFn:
    def fn(ids: torch.Tensor, k: int) -> torch.Tensor:
        h = model.embed(ids)  # [B, T, H]
        cos, sin = model.rope(model.default_positions(ids), h.dtype)
        return model.head(model.run_layers(h, cos, sin)[:, -k:])  # [B, k, V]
    return fn


@torch.no_grad()
def score_items(items: list[LongContextItem], logits_fn: TailLogitsFn, device: torch.device,
                max_batch_tokens: int) -> list[tuple[bool, float, float]]:
    """(solved, answer NLL, fraction of answer tokens that are the argmax) per item. Items of one length need no
    padding: each row is context + answer[:-1]."""
    out: list[tuple[bool, float, float]] = []
    if not items:
        return out
    length = items[0].length
    rows = max(1, max_batch_tokens // length)
    for s in range(0, len(items), rows):
        chunk = items[s:s + rows]
        ids = torch.tensor([it.context + it.answer[:-1] for it in chunk], dtype=torch.long, device=device)  # [B, L-1]
        k = max(len(it.answer) for it in chunk)
        logp = F.log_softmax(logits_fn(ids, k).float(), dim=-1).cpu()  # [B, k, V]
        for row, it in enumerate(chunk):
            n = len(it.answer)
            target = torch.tensor(it.answer)  # [n]: predicted by the last n input positions
            lp = logp[row, k - n:]  # [n, V]
            hit = lp.argmax(-1) == target  # [n]
            out.append((bool(hit.all()), -float(lp.gather(-1, target[:, None]).sum()), float(hit.float().mean())))
    return out


def evaluate_long_context(items: dict[str, dict[int, list[LongContextItem]]], logits_fn: TailLogitsFn,
                          device: torch.device, max_batch_tokens: int) -> dict[str, Any]:
    """One model's `long_context` entry: accuracy, token_accuracy and answer_nll per task and length; accuracy and
    token_accuracy averaged over tasks per length. Lengths are JSON object keys, so strings."""
    acc: dict[str, dict[str, float]] = {}
    tok: dict[str, dict[str, float]] = {}
    nll: dict[str, dict[str, float]] = {}
    for task, by_length in items.items():
        acc[task], tok[task], nll[task] = {}, {}, {}
        for length, group in by_length.items():
            scored = score_items(group, logits_fn, device, max_batch_tokens)
            acc[task][str(length)] = float(np.mean([ok for ok, _, _ in scored]))
            nll[task][str(length)] = float(np.mean([v for _, v, _ in scored]))
            tok[task][str(length)] = float(np.mean([f for _, _, f in scored]))
    lengths = sorted({int(n) for per in acc.values() for n in per})

    def mean(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
        return {str(n): float(np.mean([per_task[t][str(n)] for t in per_task if str(n) in per_task[t]]))
                for n in lengths}

    return {"accuracy": acc, "token_accuracy": tok, "answer_nll": nll, "mean_accuracy": mean(acc),
            "mean_token_accuracy": mean(tok)}


def add_long_context_retention(models: dict[str, dict[str, Any]], reference: str) -> None:
    """Each model's long-context accuracy as a percentage of the reference's, per length (mean over tasks, the
    paper's Table 4) and per (task, length); None where the reference scores 0."""
    ref = models[reference].get("long_context")
    if not ref:
        return

    def pct(value: float, base: float) -> float | None:
        return 100.0 * value / base if base else None

    for res in models.values():
        lc = res.get("long_context")
        if not lc:
            continue
        lc["retention_pct"] = {n: pct(v, ref["mean_accuracy"].get(n, 0.0)) for n, v in lc["mean_accuracy"].items()}
        lc["task_retention_pct"] = {t: {n: pct(v, ref["accuracy"].get(t, {}).get(n, 0.0)) for n, v in per.items()}
                                    for t, per in lc["accuracy"].items()}


def long_context_table(models: dict[str, dict[str, Any]]) -> str:
    """Mean accuracy / token accuracy per length (accuracy retention in brackets) for every model, one line each;
    '' when none ran."""
    scored = {name: m["long_context"] for name, m in models.items() if m.get("long_context")}
    if not scored:
        return ""
    lengths = sorted({int(n) for lc in scored.values() for n in lc["mean_accuracy"]})
    lines = ["long-context accuracy % / answer-token accuracy % (accuracy retention %) by length, mean of " + ", ".join(
        next(iter(scored.values()))["accuracy"])]
    lines.append(f"{'model':32s}" + "".join(f"{n:>20d}" for n in lengths))
    for name, lc in scored.items():
        cells = []
        for n in map(str, lengths):
            a, t, r = lc["mean_accuracy"].get(n), lc["mean_token_accuracy"].get(n), lc.get("retention_pct", {}).get(n)
            ret = f" ({r:.0f})" if r is not None else " (-)"
            cells.append("-" if a is None else f"{100 * a:.1f} / {100 * t:.1f}{ret}")
        lines.append(f"{name:32s}" + "".join(f"{c:>20s}" for c in cells))
    return "\n".join(lines)


def plot_long_context(models: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Mean accuracy vs context length, one line per model (the paper's retention-per-length view), drawn as the
    report draws it; None when matplotlib cannot be imported or nothing was scored."""
    return long_context_plot(models, path) if plots.available() else None


def prepare_items(cfg: LongContextConfig, tokens: np.ndarray, tokenizer: Any, max_len: int,
                  where: str = "eval.long_context") -> dict[str, dict[int, list[LongContextItem]]]:
    """The items for a model of context `max_len`, with the haystack from `tokens` (a data split, [N, T])."""
    lengths = resolve_lengths(cfg, max_len, where)
    special = {i for i in (tokenizer.bos_id, getattr(tokenizer, "eos_id", None)) if i is not None}
    haystack = haystack_tokens(tokens, special)
    return make_items(cfg, lengths, tokenizer.encode, tokenizer.bos_id, haystack, getattr(tokenizer, "decode", None))


def summary(cfg: LongContextConfig, items: dict[str, dict[int, list[LongContextItem]]]) -> dict[str, Any]:
    """eval.json's top-level `long_context`: what was asked and how it was scored."""
    return {"tasks": list(items), "lengths": sorted({n for per in items.values() for n in per}),
            "items": cfg.items, "seed": cfg.seed, "haystack_split": cfg.haystack_split("eval"),
            "scoring": "teacher-forced greedy match: solved when every answer token is the argmax"}
