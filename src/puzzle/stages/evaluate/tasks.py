"""Multiple-choice and last-word tasks, scored by log-likelihood (the lm-evaluation-harness way).

Formats:
  hellaswag  six lines per item: context, gold label (0-3), four endings (`.txt`, optionally .bz2/.xz/.gz)
  lambada    JSONL {"text": ...}; the task is the passage's last word, greedy: every token of it must be argmax
  jsonl      JSONL {"context": str, "choices": [str, ...], "gold": int}: any multiple-choice task of your own
  others     the layouts users hold (lm-eval / HF field names, labels files, letter keys): `task_formats`
Files are UTF-8 (a byte-order mark is fine). An ending is scored as the sum of its tokens' log-probabilities given
the context; `acc_norm` divides by the ending's length in bytes, as lm-eval does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.task_formats import (
    MultipleChoiceItem,
    TaskFormat,
    detect_format,
    jsonl_records,
    read_choices,
    read_lines,
)

__all__ = ["LastWordItem", "MultipleChoiceItem", "TaskFormat", "TaskSpec", "choose_metric", "detect_format",
           "evaluate_task", "load_task", "metrics_of", "primary_metric", "read_hellaswag", "read_lambada",
           "score_requests", "split_request", "task_names"]


@dataclass
class TaskSpec:
    path: str
    name: str | None = None  # default: the file name without extensions (see task_names for clashes)
    format: TaskFormat = "auto"
    limit: int | None = None  # first N items only
    labels: str | None = None  # a file with one gold label per line, for records that lack theirs (PIQA)
    separator: str | None = None  # between context and choice; unset: one space (the choice's own dropped)
    # The number retention and the summary use: "auto" = acc_norm for multiple choice (lm-eval's headline
    # metric for HellaSwag, PIQA, ARC), accuracy for last-word tasks.
    metric: Literal["auto", "accuracy", "acc_norm"] = "auto"

    def __post_init__(self) -> None:
        if self.metric not in ("auto", "accuracy", "acc_norm"):
            raise PuzzleError(f"task {self.path}: metric {self.metric!r} is not one of auto, accuracy, acc_norm")


@dataclass(frozen=True)
class LastWordItem:
    context: str
    target: str  # the last word with its leading space


def _stem(name: str) -> str:
    for suffix in (".bz2", ".xz", ".gz", ".jsonl", ".txt", ".json", ".csv"):
        name = name.removesuffix(suffix)
    return name


def task_names(specs: list[TaskSpec]) -> list[str]:
    """One distinct result name per task, in order. A given `name` is used as is; otherwise the file name without
    extensions, and files whose names collide (`a/hellaswag.txt`, `b/hellaswag.txt`) get as many parent
    directories as make them distinct (`a/hellaswag`, `b/hellaswag`). The same file twice, or two tasks given the
    same `name`, is an error: one result would overwrite the other."""
    given = [s.name for s in specs if s.name]
    if len(set(given)) < len(given):
        twice = next(n for n in given if given.count(n) > 1)
        raise PuzzleError(f"two eval tasks are named {twice!r}; give each task its own name")
    files = [Path(s.path).resolve() for s in specs]
    for i, f in enumerate(files):
        if not specs[i].name and files.index(f) != i:
            raise PuzzleError(f"task file {specs[i].path} is listed twice in eval.tasks / --task; list it once")
    depth = [0] * len(specs)

    def name(i: int) -> str:
        parts = files[i].parent.parts[len(files[i].parent.parts) - depth[i]:] if depth[i] else ()
        return "/".join([*parts, _stem(files[i].name)])

    while True:
        names = [s.name or name(i) for i, s in enumerate(specs)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and not specs[i].name]
        if not clash:
            return names
        for i in clash:
            if depth[i] >= len(files[i].parent.parts):
                raise PuzzleError(f"task file {specs[i].path} gives the name {names[i]!r}, which another task uses; "
                                  "set a distinct `name` for it in eval.tasks")
            depth[i] += 1


def read_hellaswag(path: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    lines = [text for _, text in read_lines(path)]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise PuzzleError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings per item)")
    items = []
    for start in range(0, len(lines), 6):
        if limit is not None and len(items) >= limit:
            break
        label = lines[start + 1].strip()
        if not label.isdigit() or not 0 <= int(label) < 4:
            raise PuzzleError(f"{path}:{start + 2}: gold label {label!r} is not 0-3; fix that line")
        items.append(MultipleChoiceItem(lines[start], tuple(lines[start + 2:start + 6]), int(label)))
    return items


def read_lambada(path: Path, limit: int | None = None) -> list[LastWordItem]:
    items = []
    for lineno, record in jsonl_records(path, limit):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            raise PuzzleError(f"{path}:{lineno}: a LAMBADA line needs a \"text\" string with at least two words")
        context, word = text.rstrip().rsplit(" ", 1)
        items.append(LastWordItem(context, " " + word))
    return items


def load_task(spec: TaskSpec) -> list[MultipleChoiceItem] | list[LastWordItem]:
    path = Path(spec.path)
    if path.is_dir():  # one task from many files, e.g. MMLU's 57 per-subject CSVs; `limit` applies per file
        files = sorted(f for f in path.iterdir() if f.is_file() and ".csv" in f.name)
        if not files or spec.labels is not None:
            raise PuzzleError(f"task directory {path} " + ("takes no `labels`" if files else "holds no .csv files")
                              + "; give a task file, or a directory of MMLU-style CSVs")
        return [it for f in files for it in load_task(replace(spec, path=str(f)))]  # type: ignore[misc]
    if not path.is_file():
        raise PuzzleError(f"task file {path} does not exist; fix eval.tasks[].path")
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    if fmt in ("hellaswag", "lambada") and (spec.labels is not None or (fmt == "lambada" and spec.separator)):
        raise PuzzleError(f"task file {path} is in the {fmt} format, which takes no `labels`"
                          + ("" if fmt == "hellaswag" else " or `separator`") + "; remove them from its task entry")
    items: list[MultipleChoiceItem] | list[LastWordItem]
    if fmt == "hellaswag":
        items = read_hellaswag(path, spec.limit)
    elif fmt == "lambada":
        items = read_lambada(path, spec.limit)
    else:
        items = read_choices(path, fmt, spec.limit, Path(spec.labels) if spec.labels is not None else None)
    if not items:
        raise PuzzleError(f"task file {path} holds no items; check its format ({fmt})")
    if spec.separator is not None:
        items = [replace(it, separator=spec.separator) for it in items]  # type: ignore[type-var]
    # checked here, not after scoring: a metric the task lacks would otherwise fail after every model ran
    kind = "last-word" if isinstance(items[0], LastWordItem) else "multiple-choice"
    choose_metric(spec.metric, metrics_of(items), f"file {path} ({kind})")
    return items


# ---- scoring ------------------------------------------------------------------------------------------------

Encoder = Callable[[str], list[int]]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, T] -> logits [B, T, V]


def split_request(encode: Encoder, context: str, continuation: str, bos_id: int | None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval forms them: encode the whole string and split at the context,
    with trailing context whitespace moved into the continuation."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = encode(stripped)
    whole = encode(stripped + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else encode(continuation)
    prefix = [bos_id] if bos_id is not None else []
    return prefix + ctx, cont


def target_logprobs(logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits [B, T, V]: the summed log-prob of the scored targets and whether each is the argmax.

    rows, positions, targets [N]: one entry per scored token. Only these N positions go through log-softmax.
    Returns (log-prob sums [B], every scored token greedy [B] bool).
    """
    picked = logits[rows, positions].float()  # [N, V]
    lp = F.log_softmax(picked, dim=-1).gather(-1, targets[:, None])[:, 0]  # [N]
    missed = (picked.argmax(-1) != targets).float()  # [N]
    zeros = torch.zeros(logits.shape[0], device=logits.device)
    return zeros.index_add(0, rows, lp), zeros.index_add(0, rows, missed) == 0


@torch.no_grad()
def score_requests(logits_fn: LogitsFn, requests: list[tuple[list[int], list[int]]], device: torch.device,
                   batch_size: int, max_len: int, max_tokens: int | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation): sum of continuation log-probs and whether every token is the argmax.

    Requests are sorted by length and right-padded: with a causal model padding after a sequence does not
    change the logits at its positions. A batch holds `batch_size` requests or, with `max_tokens`, as many as
    fit that many (padded) tokens. Only the continuation positions leave the device.
    """
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    s = 0
    while s < len(order):
        width = min(len(requests[order[s]][0]) + len(requests[order[s]][1]), max_len + 1) - 1  # the longest
        rows = batch_size if max_tokens is None else max(1, max_tokens // max(width, 1))
        chunk = order[s:s + rows]
        s += len(chunk)
        seqs = [(requests[i][0] + requests[i][1])[-(max_len + 1):] for i in chunk]
        # a continuation longer than the context window is scored on its last max_len tokens
        conts = [min(len(requests[i][1]), len(q) - 1) for i, q in zip(chunk, seqs, strict=True)]
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        row_of, pos_of, targets = [], [], []  # one entry per continuation token
        for row, (q, n) in enumerate(zip(seqs, conts, strict=True)):
            ids[row, :len(q) - 1] = torch.tensor(q[:-1])
            row_of += [row] * n
            pos_of += range(len(q) - 1 - n, len(q) - 1)  # positions predicting the continuation
            targets += q[len(q) - n:]
        logits = logits_fn(ids.to(device))  # [B, width, V]
        ll, greedy = target_logprobs(logits, torch.tensor(row_of, device=device), torch.tensor(pos_of, device=device),
                                     torch.tensor(targets, device=device))
        for row, (i, s_ll, s_greedy) in enumerate(zip(chunk, ll.tolist(), greedy.tolist(), strict=True)):
            results[i] = (s_ll, s_greedy)
    return results


def evaluate_task(items: list[MultipleChoiceItem] | list[LastWordItem], logits_fn: LogitsFn, encode: Encoder,
                  bos_id: int | None, device: torch.device, batch_size: int, max_len: int,
                  max_tokens: int | None = None) -> dict[str, float]:
    """accuracy (and acc_norm for multiple choice) over the items."""
    if isinstance(items[0], LastWordItem):
        reqs = [split_request(encode, it.context, it.target, bos_id) for it in items]  # type: ignore[union-attr]
        scored = score_requests(logits_fn, reqs, device, batch_size, max_len, max_tokens)
        nll = -sum(s for s, _ in scored) / len(scored)
        return {"accuracy": sum(g for _, g in scored) / len(scored), "target_nll": nll, "n": len(items)}
    strings = [it.requests() for it in items]  # type: ignore[union-attr]
    reqs = [split_request(encode, ctx, cont, bos_id) for pairs in strings for ctx, cont in pairs]
    scored = score_requests(logits_fn, reqs, device, batch_size, max_len, max_tokens)
    correct = correct_norm = 0
    pos = 0
    for it, pairs in zip(items, strings, strict=True):
        n = len(pairs)
        lls = [s for s, _ in scored[pos:pos + n]]
        lengths = [max(len(cont.encode()), 1) for _, cont in pairs]  # bytes of what is scored (lm-eval's acc_norm)
        correct += max(range(n), key=lambda j: lls[j]) == it.gold  # type: ignore[union-attr]
        correct_norm += max(range(n), key=lambda j: lls[j] / lengths[j]) == it.gold  # type: ignore[union-attr]
        pos += n
    return {"accuracy": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


def metrics_of(items: list[MultipleChoiceItem] | list[LastWordItem]) -> tuple[str, ...]:
    """The metrics `evaluate_task` gives for these items: a last-word task has no choices to length-normalize."""
    return ("accuracy",) if isinstance(items[0], LastWordItem) else ("accuracy", "acc_norm")


def choose_metric(metric: str, available: Collection[str], task: str) -> str:
    """The one rule for which metric retention and the summary report (see TaskSpec.metric): "auto" is acc_norm
    where the task has it, else accuracy; a named metric must be among `available`."""
    if metric == "auto":
        return "acc_norm" if "acc_norm" in available else "accuracy"
    if metric not in available:
        raise PuzzleError(f"task {task}: metric {metric!r} does not apply to it (it has "
                          f"{sorted(k for k in available if k.startswith('acc'))}); set metric: accuracy")
    return metric


def primary_metric(spec: TaskSpec, result: dict[str, float]) -> str:
    """Which of a task's results retention and the summary report (see TaskSpec.metric)."""
    return choose_metric(spec.metric, result, spec.path)

