"""The token batches replace-1-block scoring runs on: held-out LM sequences and multiple-choice task rows.

Task files are read and tokenized by `puzzle.stages.evaluate.tasks` (its readers and `split_request`, as lm-eval
forms requests); here they only become rows of one batch: context + choice, the choice tokens marked as targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.tasks import MultipleChoiceItem, TaskSpec, load_task, split_request


@dataclass
class TaskItem:
    context: list[int]
    choices: list[list[int]]
    gold: int
    # task_accuracy: the gold choice has the highest summed log-prob; long_context: one choice (the answer), solved
    # when every one of its tokens is the argmax (teacher-forced greedy match, as `puzzle eval` scores it)
    metric: str = "task_accuracy"


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
    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"task file {path} does not exist; set score.task_file to a JSONL file or leave it unset")
    items = load_task(TaskSpec(str(path), limit=max_items))
    if not isinstance(items[0], MultipleChoiceItem):
        raise PuzzleError(f"{path} is a last-word task; score.task_file needs a multiple-choice task "
                          '(JSONL {"context": ..., "choices": [...], "gold": i} or HellaSwag)')
    if any(it.continuation is not None for it in items):  # type: ignore[union-attr]
        raise PuzzleError(f"{path} gives one context per choice (partial scoring), which score.task_file does not "
                          "support; list it under eval.tasks instead, or use a task with one context per item")
    out = []
    for item in items:
        # the same (context, continuation) strings as `puzzle eval` scores, separator included
        requests = [split_request(encode, ctx, cont, bos_id) for ctx, cont in item.requests()]  # type: ignore
        out.append(TaskItem(requests[0][0], [cont for _, cont in requests], item.gold))
    return out
