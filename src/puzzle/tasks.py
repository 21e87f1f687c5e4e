"""Multiple-choice and last-word tasks, scored by log-likelihood (the lm-evaluation-harness way).

Formats:
  hellaswag  six lines per item: context, gold label (0-3), four endings (`.txt`, optionally .bz2/.xz/.gz)
  lambada    JSONL {"text": ...}; the task is the passage's last word, greedy: every token of it must be argmax
  jsonl      JSONL {"context": str, "choices": [str, ...], "gold": int}: any multiple-choice task of your own
An ending is scored as the sum of its tokens' log-probabilities given the context; `acc_norm` divides by the
ending's length in bytes, as lm-eval does.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import torch
import torch.nn.functional as F

from puzzle.errors import PuzzleError

TaskFormat = Literal["auto", "hellaswag", "lambada", "jsonl"]


@dataclass
class TaskSpec:
    path: str
    name: str | None = None  # default: the file name without extensions
    format: TaskFormat = "auto"
    limit: int | None = None  # first N items only


@dataclass(frozen=True)
class MultipleChoiceItem:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class LastWordItem:
    context: str
    target: str  # the last word with its leading space


def open_text(path: Path) -> IO[str]:
    opener = {".bz2": bz2.open, ".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")  # type: ignore[operator]


def task_name(spec: TaskSpec) -> str:
    if spec.name:
        return spec.name
    name = Path(spec.path).name
    for suffix in (".bz2", ".xz", ".gz", ".jsonl", ".txt", ".json"):
        name = name.removesuffix(suffix)
    return name


def detect_format(path: Path) -> str:
    if ".jsonl" not in path.name and ".json" not in path.name:
        return "hellaswag"
    with open_text(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                return "jsonl" if "choices" in record else "lambada"
    return "jsonl"


def read_hellaswag(path: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    with open_text(path) as f:
        lines = f.read().splitlines()
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


def _jsonl_records(path: Path, limit: int | None) -> list[tuple[int, dict]]:
    out = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PuzzleError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix that line") from None
    return out


def read_lambada(path: Path, limit: int | None = None) -> list[LastWordItem]:
    items = []
    for lineno, record in _jsonl_records(path, limit):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            raise PuzzleError(f"{path}:{lineno}: a LAMBADA line needs a \"text\" with at least two words")
        context, word = text.rstrip().rsplit(" ", 1)
        items.append(LastWordItem(context, " " + word))
    return items


def read_choice_jsonl(path: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    items = []
    for lineno, record in _jsonl_records(path, limit):
        if not isinstance(record, dict) or not {"context", "choices", "gold"} <= set(record):
            raise PuzzleError(f"{path}:{lineno}: needs \"context\", \"choices\" and \"gold\" fields")
        choices, gold = record["choices"], record["gold"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise PuzzleError(f"{path}:{lineno}: \"choices\" must be a list of at least two strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise PuzzleError(
                f"{path}:{lineno}: gold index {gold!r} is out of range for {len(choices)} choices; "
                f"use 0..{len(choices) - 1}"
            )
        items.append(MultipleChoiceItem(str(record["context"]), tuple(choices), gold))
    return items


def load_task(spec: TaskSpec) -> list[MultipleChoiceItem] | list[LastWordItem]:
    path = Path(spec.path)
    if not path.is_file():
        raise PuzzleError(f"task file {path} does not exist; fix eval.tasks[].path")
    fmt = detect_format(path) if spec.format == "auto" else spec.format
    reader = {"hellaswag": read_hellaswag, "lambada": read_lambada, "jsonl": read_choice_jsonl}[fmt]
    items = reader(path, spec.limit)
    if not items:
        raise PuzzleError(f"task file {path} holds no items; check its format ({fmt})")
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


@torch.no_grad()
def score_requests(logits_fn: LogitsFn, requests: list[tuple[list[int], list[int]]], device: torch.device,
                   batch_size: int, max_len: int) -> list[tuple[float, bool]]:
    """For each (context, continuation): sum of continuation log-probs and whether every token is the argmax.

    Requests are sorted by length and right-padded: with a causal model padding after a sequence does not
    change the logits at its positions.
    """
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        seqs = [(requests[i][0] + requests[i][1])[-(max_len + 1):] for i in chunk]
        conts = [len(requests[i][1]) for i in chunk]
        width = max(len(q) for q in seqs) - 1
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, q in enumerate(seqs):
            ids[row, :len(q) - 1] = torch.tensor(q[:-1])
        logprobs = F.log_softmax(logits_fn(ids.to(device)).float(), dim=-1).cpu()  # [B, width, V]
        for row, (i, q, n) in enumerate(zip(chunk, seqs, conts, strict=True)):
            target = torch.tensor(q[len(q) - n:])  # [n]
            lp = logprobs[row, len(q) - 1 - n:len(q) - 1]  # [n, V]: positions predicting the continuation
            results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return results


def evaluate_task(items: list[MultipleChoiceItem] | list[LastWordItem], logits_fn: LogitsFn, encode: Encoder,
                  bos_id: int | None, device: torch.device, batch_size: int, max_len: int) -> dict[str, float]:
    """accuracy (and acc_norm for multiple choice) over the items."""
    if isinstance(items[0], LastWordItem):
        reqs = [split_request(encode, it.context, it.target, bos_id) for it in items]  # type: ignore[union-attr]
        scored = score_requests(logits_fn, reqs, device, batch_size, max_len)
        nll = -sum(s for s, _ in scored) / len(scored)
        return {"accuracy": sum(g for _, g in scored) / len(scored), "target_nll": nll, "n": len(items)}
    reqs = []
    for it in items:
        for choice in it.choices:  # type: ignore[union-attr]
            reqs.append(split_request(encode, it.context, " " + choice.lstrip(" "), bos_id))
    scored = score_requests(logits_fn, reqs, device, batch_size, max_len)
    correct = correct_norm = 0
    pos = 0
    for it in items:
        n = len(it.choices)  # type: ignore[union-attr]
        lls = [s for s, _ in scored[pos:pos + n]]
        lengths = [len((" " + c.lstrip(" ")).encode()) for c in it.choices]  # type: ignore[union-attr]
        correct += max(range(n), key=lambda j: lls[j]) == it.gold  # type: ignore[union-attr]
        correct_norm += max(range(n), key=lambda j: lls[j] / lengths[j]) == it.gold  # type: ignore[union-attr]
        pos += n
    return {"accuracy": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}
