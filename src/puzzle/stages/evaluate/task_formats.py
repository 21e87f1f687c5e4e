"""Multiple-choice task files in the layouts users already hold, read into one item type.

JSON-lines layouts (`.jsonl` / `.json`, optionally .bz2/.xz/.gz), detected from the first record's fields or
named by a task's `format:`; each builds the prompt lm-evaluation-harness builds for that task (docs/tasks.md
has one example line each):
  jsonl         {"context", "choices", "gold"}, or {"contexts": [...], "continuation", "gold"}: a context per choice
  query         {"query", "choices", "gold"}                     lm-eval's processed multiple-choice documents
  hellaswag-hf  {"ctx", "endings", "label"} (+ activity_label, ctx_a, ctx_b)   HellaSwag as on the HF hub
  piqa          {"goal", "sol1", "sol2", "label"}
  arc           {"question", "choices", "answer"}: a list or {"text", "label"}; gold as an index or letter, or "answerKey"
  mmlu          the same fields (auto when a "subject" field is present): lettered choices, the letter is scored
  winogrande    {"sentence", "option1", "option2", "answer": "1"|"2"}: the option fills "_", the rest is scored
  boolq         {"passage", "question", "answer": true|false} (or "label": 0|1): choices no / yes
  mmlu-csv      MMLU's CSV rows: question, A, B, C, D, answer letter (no header)
A labels file (`labels:`, one gold per line, e.g. PIQA's valid-labels.lst) gives each record's gold in order.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import json
import lzma
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from puzzle.core.errors import PuzzleError

TaskFormat = Literal["auto", "hellaswag", "lambada", "jsonl", "query", "hellaswag-hf", "piqa", "arc", "mmlu",
                     "winogrande", "boolq", "mmlu-csv"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MultipleChoiceItem:
    context: str
    choices: tuple[str, ...]
    gold: int
    separator: str | None = None  # None: one space, the choice's own leading spaces dropped; else verbatim
    continuation: str | None = None  # set: context + separator + choice is the context and this is scored

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) strings scored for each choice."""
        joined = [" " + c.lstrip(" ") if self.separator is None else self.separator + c for c in self.choices]
        if self.continuation is None:
            return [(self.context, j) for j in joined]
        return [(self.context + j, self.continuation) for j in joined]


# ---- file access ---------------------------------------------------------------------------------------------

def open_binary(path: Path) -> IO[bytes]:
    opener = {".bz2": bz2.open, ".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rb")  # type: ignore[operator]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line break); a UTF-8 byte-order mark is dropped, and a byte that is
    not UTF-8 is an error naming its line (decoding line by line is what makes the number exact)."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PuzzleError(f"{path}:{lineno}: byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8; "
                                  "re-save the file as UTF-8") from None
            yield lineno, text.rstrip("\r\n")


def json_line(path: Path, lineno: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise PuzzleError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix that line") from None


def jsonl_records(path: Path, limit: int | None) -> list[tuple[int, object]]:
    out = []
    for lineno, line in read_lines(path):
        if limit is not None and len(out) >= limit:
            break
        if line.strip():
            out.append((lineno, json_line(path, lineno, line)))
    return out


def describe(record: object) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    return "fields " + ", ".join(map(repr, record)) if record else "no fields"


# ---- detection -----------------------------------------------------------------------------------------------

NATIVE_FIELDS = ("context", "contexts", "choices", "gold")
# First match wins: the specific layouts before the native one, whose field names they share.
DETECT: list[tuple[tuple[str, ...], str]] = [
    (("query",), "query"), (("endings",), "hellaswag-hf"), (("goal", "sol1"), "piqa"),
    (("sentence", "option1"), "winogrande"), (("passage", "question"), "boolq"),
    (("question", "choices", "subject"), "mmlu"), (("question", "choices"), "arc"),
]


def detect_format(path: Path) -> str:
    """hellaswag for text files, mmlu-csv for CSV; for JSON lines, from the first record's fields."""
    if ".csv" in path.name:
        return "mmlu-csv"
    if ".jsonl" not in path.name and ".json" not in path.name:
        return "hellaswag"
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        record = json_line(path, lineno, line)
        if isinstance(record, dict):
            for fields, fmt in DETECT:
                if all(k in record for k in fields):
                    return fmt
            if any(k in record for k in NATIVE_FIELDS):
                return "jsonl"
            if "text" in record:
                return "lambada"
        raise PuzzleError(
            f"{path}:{lineno}: a task line needs \"context\", \"choices\" and \"gold\" (multiple choice) or "
            f"\"text\" (LAMBADA), or another known layout (docs/tasks.md); this one has {describe(record)}"
        )
    return "jsonl"


# ---- one record ----------------------------------------------------------------------------------------------

class Record:
    """One JSON object with its location; field accessors raise one-line errors naming file, line and field."""

    def __init__(self, data: object, where: str, fmt: str, label: tuple[str, str] | None = None) -> None:
        if not isinstance(data, dict):
            raise PuzzleError(f"{where}: a {fmt} line must be a JSON object; this one is {describe(data)}")
        self.data, self.where, self.fmt, self.label = data, where, fmt, label

    def get(self, field: str) -> Any:
        if field not in self.data:
            raise PuzzleError(f"{self.where}: missing {field!r}; a {self.fmt} line has {describe(self.data)} "
                              "(docs/tasks.md shows each layout)")
        return self.data[field]

    def text(self, field: str) -> str:
        value = self.get(field)
        if not isinstance(value, str):
            raise PuzzleError(f"{self.where}: {field!r} must be a string, got {json.dumps(value)}")
        return value

    def strings(self, field: str) -> list[str]:
        value = self.get(field)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
            raise PuzzleError(f"{self.where}: {field!r} must be a list of at least two strings")
        return value

    def gold(self, field: str, n: int, letters: list[str] | None = None, base: int = 0, bools: bool = False) -> int:
        """The gold index from the labels file when one is given, else from `field`: an integer (minus `base`),
        a digit string, a letter (`letters`, default A..), or true/false when `bools`."""
        value, where = (self.label[0], self.label[1]) if self.label else (self.get(field), self.where)
        index = _gold_index(value, letters or list(LETTERS[:n]), base, bools)
        if index is None or not 0 <= index < n:
            expect = f"an index 0..{n - 1}" if base == 0 else f"a number {base}..{n - 1 + base}"
            expect += f" or one of {'/'.join(letters or LETTERS[:n])}" + (" or true/false" if bools else "")
            raise PuzzleError(f"{where}: gold {field!r} is {json.dumps(value)}; expected {expect} "
                              f"for {n} choices")
        return index


def _gold_index(value: object, letters: list[str], base: int, bools: bool) -> int | None:
    if isinstance(value, bool):
        return int(value) if bools else None
    if isinstance(value, int):
        return value - base
    if not isinstance(value, str):
        return None
    value = value.strip()
    if bools and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    if value in letters:
        return letters.index(value)
    if value.lstrip("-").isdigit():
        return int(value) - base
    return None


# ---- the layouts ---------------------------------------------------------------------------------------------

def _native(r: Record) -> MultipleChoiceItem:
    if "contexts" in r.data:  # one context per choice, a shared continuation scored after each
        contexts = r.strings("contexts")
        return MultipleChoiceItem("", tuple(contexts), _native_gold(r, len(contexts)), "", r.text("continuation"))
    for k in ("context", "choices", "gold"):
        if k not in r.data and not (k == "gold" and r.label):
            raise PuzzleError(f"{r.where}: missing {k!r}; a multiple-choice line needs \"context\" (string), "
                              "\"choices\" (list of strings) and \"gold\" (index)")
    context = r.data["context"]
    if not isinstance(context, str):
        raise PuzzleError(f"{r.where}: \"context\" must be a string, got {json.dumps(context)}; use \"\" for none")
    choices = r.strings("choices")
    return MultipleChoiceItem(context, tuple(choices), _native_gold(r, len(choices)))


def _native_gold(r: Record, n: int) -> int:
    if r.label:
        return r.gold("gold", n)
    gold = r.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise PuzzleError(f"{r.where}: \"gold\" must be an integer index into \"choices\" (0..{n - 1}), "
                          f"got {json.dumps(gold)}")
    if not 0 <= gold < n:
        raise PuzzleError(f"{r.where}: gold index {gold} is out of range for {n} choices; use 0..{n - 1}")
    return gold


def _query(r: Record) -> MultipleChoiceItem:
    choices = r.strings("choices")
    return MultipleChoiceItem(r.text("query"), tuple(choices), r.gold("gold", len(choices)))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's " [title]" becomes a sentence end, other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_hf(r: Record) -> MultipleChoiceItem:
    if "ctx_a" in r.data and "ctx_b" in r.data:
        ctx = r.text("ctx_a") + " " + r.text("ctx_b").capitalize()
    else:
        ctx = r.text("ctx")
    activity = r.data.get("activity_label")
    query = _hellaswag_clean(f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx)
    endings = [_hellaswag_clean(e) for e in r.strings("endings")]
    return MultipleChoiceItem(query, tuple(endings), r.gold("label", len(endings)))


def _piqa(r: Record) -> MultipleChoiceItem:
    return MultipleChoiceItem(f"Question: {r.text('goal')}\nAnswer:", (r.text("sol1"), r.text("sol2")),
                              r.gold("label", 2))


def _arc_choices(r: Record) -> tuple[list[str], list[str] | None]:
    """(choice texts, their keys when the file gives them: ARC's {"text": [...], "label": ["A", ...]})."""
    value = r.get("choices")
    if isinstance(value, dict):
        sub = Record(value, r.where + " \"choices\"", r.fmt)
        return sub.strings("text"), sub.strings("label")
    return r.strings("choices"), None


def _arc_gold(r: Record, n: int, keys: list[str] | None) -> int:
    field = "answerKey" if "answerKey" in r.data and "answer" not in r.data else "answer"
    return r.gold(field, n, letters=keys)


def _arc(r: Record) -> MultipleChoiceItem:
    choices, keys = _arc_choices(r)
    return MultipleChoiceItem(f"Question: {r.text('question')}\nAnswer:", tuple(choices),
                              _arc_gold(r, len(choices), keys))


def _mmlu(r: Record) -> MultipleChoiceItem:
    choices, keys = _arc_choices(r)
    letters = LETTERS[:len(choices)]
    prompt = r.text("question").strip() + "".join(f"\n{k}. {c}" for k, c in zip(letters, choices)) + "\nAnswer:"
    return MultipleChoiceItem(prompt, tuple(letters), _arc_gold(r, len(choices), keys))


def _winogrande(r: Record) -> MultipleChoiceItem:
    sentence = r.text("sentence")
    if "_" not in sentence:
        raise PuzzleError(f"{r.where}: 'sentence' has no \"_\" blank for the option to fill")
    blank = sentence.index("_")
    return MultipleChoiceItem(sentence[:blank], (r.text("option1"), r.text("option2")),
                              r.gold("answer", 2, letters=["1", "2"], base=1), "", " " + sentence[blank + 1:].strip())


def _boolq(r: Record) -> MultipleChoiceItem:
    field = "answer" if "answer" in r.data or "label" not in r.data else "label"
    return MultipleChoiceItem(f"{r.text('passage')}\nQuestion: {r.text('question')}?\nAnswer:", ("no", "yes"),
                              r.gold(field, 2, letters=["no", "yes"], bools=True))


LAYOUTS: dict[str, Callable[[Record], MultipleChoiceItem]] = {
    "jsonl": _native, "query": _query, "hellaswag-hf": _hellaswag_hf, "piqa": _piqa, "arc": _arc, "mmlu": _mmlu,
    "winogrande": _winogrande, "boolq": _boolq,
}


# ---- whole files ---------------------------------------------------------------------------------------------

def read_labels(path: Path) -> list[tuple[str, str]]:
    """(label, "file:line") per non-blank line of a labels file."""
    if not path.is_file():
        raise PuzzleError(f"labels file {path} does not exist; fix eval.tasks[].labels")
    return [(text.strip(), f"{path}:{lineno}") for lineno, text in read_lines(path) if text.strip()]


def _attach_labels(path: Path, n_records: int, labels: list[tuple[str, str]] | None,
                   limit: int | None, labels_path: Path | None) -> list[tuple[str, str] | None]:
    if labels is None:
        return [None] * n_records
    if len(labels) < n_records or (limit is None and len(labels) != n_records):
        raise PuzzleError(f"{labels_path} has {len(labels)} labels but {path} has {n_records} records; "
                          "a labels file holds one label per record, in order")
    return list(labels[:n_records])


def read_choices(path: Path, fmt: str, limit: int | None = None,
                 labels_path: Path | None = None) -> list[MultipleChoiceItem]:
    """A JSON-lines or CSV multiple-choice file in layout `fmt` (one of LAYOUTS, or mmlu-csv)."""
    labels = read_labels(labels_path) if labels_path is not None else None
    if fmt == "mmlu-csv":
        rows = _csv_records(path, limit)
    else:
        rows = [(str(lineno), record) for lineno, record in jsonl_records(path, limit)]
    attached = _attach_labels(path, len(rows), labels, limit, labels_path)
    build = LAYOUTS["mmlu" if fmt == "mmlu-csv" else fmt]
    return [build(Record(rec, f"{path}:{line}", fmt, label)) for (line, rec), label in zip(rows, attached)]


def _csv_records(path: Path, limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """MMLU's CSV: question, the choices, the answer letter; a field may span lines (quoted)."""
    lines = (text + "\n" for _, text in read_lines(path))
    reader = csv.reader(lines)
    out: list[tuple[str, dict[str, Any]]] = []
    for row in reader:
        if limit is not None and len(out) >= limit:
            break
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 4:
            raise PuzzleError(f"{path}:{reader.line_num}: an MMLU CSV row is question, choices..., answer letter; "
                              f"this one has {len(row)} columns")
        out.append((str(reader.line_num), {"question": row[0], "choices": row[1:-1], "answer": row[-1]}))
    return out
