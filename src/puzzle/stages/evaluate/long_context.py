"""Long-context probes in the manner of RULER, built from the run's own text: no download, deterministic by seed.

Tasks (each item is one token sequence of exactly the requested length: BOS, text, question, answer):
  niah_single        one "special magic number" needle for a key hidden in haystack text; asked for its value
  niah_multikey      four needles with different keys; asked for one key's value
  variable_tracking  two chains "VAR A = 12345. ... VAR B = VAR A. ..." hidden in the haystack; asked which
                     variables hold one chain's value (answer: its variables in the order they were assigned)
  frequent_words     a list of words in which one word appears most often; asked for that word
The haystack is a seed-chosen window of a data split's token file (the run's text, already tokenized by the
parent's tokenizer); needles and questions are encoded with the same tokenizer. Scoring is in
`puzzle.stages.evaluate.long_context_eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.tasks import split_request

TASKS = ("niah_single", "niah_multikey", "variable_tracking", "frequent_words")
SPLITS = ("train", "valid", "test")
# The haystack's data split when `split` is unset: test for eval, valid for score (scoring must not read the test
# split, which only eval sees).
DEFAULT_HAYSTACK_SPLIT = {"eval": "test", "score": "valid"}
MIN_DEFAULT_LENGTH = 1024  # default lengths: powers of two from here to the parent's context
Encoder = Callable[[str], list[int]]


@dataclass
class LongContextConfig:
    lengths: list[int] = field(default_factory=list)  # tokens per item; empty = 1024, 2048, ... up to the context
    items: int = 20  # items per (task, length)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seed: int = 0
    split: str | None = None  # the data split whose token file is the haystack; None: DEFAULT_HAYSTACK_SPLIT
    max_batch_tokens: int = 32768  # rows per forward pass = max(1, max_batch_tokens // length)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise PuzzleError(f"long_context.tasks: unknown task {unknown[0]!r}; known tasks: {list(TASKS)}")
        if not self.tasks:
            raise PuzzleError(f"long_context.tasks is empty; list some of {list(TASKS)} or remove long_context")
        if len(set(self.tasks)) < len(self.tasks):
            raise PuzzleError("long_context.tasks lists a task twice; list each once")
        bad = [n for n in self.lengths if n <= 0]
        if bad:
            raise PuzzleError(f"long_context.lengths: {bad[0]} is not a positive token count")
        for name in ("items", "max_batch_tokens"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"long_context.{name} must be positive, got {getattr(self, name)}")
        if self.split is not None and self.split not in SPLITS:
            raise PuzzleError(f"long_context.split {self.split!r} is not one of {list(SPLITS)}")

    def haystack_split(self, stage: Literal["eval", "score"]) -> str:
        """The data split `stage` reads haystacks from: `split` when set, else that stage's default."""
        return self.split or DEFAULT_HAYSTACK_SPLIT[stage]


def resolve_lengths(cfg: LongContextConfig, max_len: int, where: str = "eval.long_context") -> list[int]:
    """The configured lengths (sorted, distinct), or powers of two from 1024 to `max_len` (the model's context);
    a length above the context is an error, since the model never saw such positions."""
    if not cfg.lengths:
        out, n = [], MIN_DEFAULT_LENGTH
        while n <= max_len:
            out.append(n)
            n *= 2
        return out or [max_len]
    too_long = [n for n in cfg.lengths if n > max_len]
    if too_long:
        raise PuzzleError(f"{where}.lengths: {too_long[0]} is above the parent's context ({max_len} tokens, "
                          "max_position_embeddings); drop it, or leave lengths empty for powers of two up to it")
    return sorted(set(cfg.lengths))


@dataclass(frozen=True)
class LongContextItem:
    task: str
    length: int  # == len(context) + len(answer)
    context: list[int]  # BOS, haystack with the inserted text, question
    answer: list[int]  # the tokens the model must produce next


# Keys of the needles: "adjective-noun", as RULER's word keys; also the fallback vocabulary of frequent_words.
ADJECTIVES = ("amber", "brave", "calm", "daring", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid",
              "witty", "young", "zesty", "bold", "crisp", "dusty", "fresh", "golden")
NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river", "saddle", "tunnel",
         "violin", "walnut", "yarrow", "zephyr", "basket", "cactus", "dolphin", "feather", "glacier", "hammer")


class _Builder:
    """Token-level assembly of one item: haystack tokens with encoded inserts at given positions."""

    def __init__(self, encode: Encoder, bos_id: int | None, haystack: np.ndarray, rng: np.random.Generator,
                 sentence_ends: np.ndarray | None = None, starts: np.ndarray | None = None) -> None:
        self.encode, self.bos_id, self.haystack, self.rng = encode, bos_id, haystack, rng
        self.sentence_ends = sentence_ends  # token ids ending a sentence: inserts go right after one
        self.starts = starts if starts is not None and len(starts) else np.arange(len(haystack))  # window starts

    def filler(self, n: int) -> list[int]:
        """`n` consecutive haystack tokens from a random start (wrapping around)."""
        start = int(self.rng.choice(self.starts))
        return np.take(self.haystack, np.arange(start, start + n), mode="wrap").tolist()

    def assemble(self, task: str, length: int, intro: str, inserts: list[str], question: str,
                 answer: str) -> LongContextItem:
        """BOS + intro + haystack with `inserts` (in order, at sorted random positions) + question + answer,
        the haystack sized so that the whole is exactly `length` tokens."""
        head = ([self.bos_id] if self.bos_id is not None else []) + self.encode(intro)
        pieces = [self.encode(s) for s in inserts]
        q_ids, a_ids = split_request(self.encode, question, answer, None)
        fixed = len(head) + sum(map(len, pieces)) + len(q_ids) + len(a_ids)
        n = length - fixed
        if n < 0:
            raise PuzzleError(f"long-context length {length} is too short for {task} (its text alone is {fixed} "
                              "tokens); use longer lengths")
        hay = self.filler(n)
        at = np.sort(self.rng.choice(self._slots(hay), size=len(pieces)))
        body: list[int] = []
        prev = 0
        for pos, piece in zip(at.tolist(), pieces, strict=True):
            body += hay[prev:pos] + piece
            prev = pos
        body += hay[prev:]
        return LongContextItem(task, length, head + body + q_ids, a_ids)

    def _slots(self, hay: list[int]) -> np.ndarray:
        """Where an insert may go: after a sentence end (as RULER places needles), else anywhere."""
        if self.sentence_ends is not None and len(hay):
            after = np.nonzero(np.isin(np.asarray(hay), self.sentence_ends))[0] + 1
            if len(after):
                return np.concatenate([[0], after])
        return np.arange(len(hay) + 1)

    def key(self, taken: set[str]) -> str:
        while True:
            k = f"{ADJECTIVES[self.rng.integers(len(ADJECTIVES))]}-{NOUNS[self.rng.integers(len(NOUNS))]}"
            if k not in taken:
                taken.add(k)
                return k

    def number(self, taken: set[str], digits: int = 7) -> str:
        while True:
            v = str(int(self.rng.integers(10 ** (digits - 1), 10 ** digits)))
            if v not in taken:
                taken.add(v)
                return v


NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")


def niah(b: _Builder, length: int, keys: int, task: str) -> LongContextItem:
    taken_k: set[str] = set()
    taken_v: set[str] = set()
    pairs = [(b.key(taken_k), b.number(taken_v)) for _ in range(keys)]
    order = b.rng.permutation(keys).tolist()  # needles in random order; the asked one is pairs[0]
    inserts = [f" One of the special magic numbers for {pairs[i][0]} is: {pairs[i][1]}." for i in order]
    key, value = pairs[0]
    question = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                f"The special magic number for {key} is:")
    return b.assemble(task, length, NIAH_INTRO, inserts, question, f" {value}")


def variable_tracking(b: _Builder, length: int, chains: int = 2, hops: int = 4) -> LongContextItem:
    taken_v: set[str] = set()
    names: set[str] = set()

    def var() -> str:
        while True:
            name = "".join(chr(65 + int(c)) for c in b.rng.integers(0, 26, size=5))
            if name not in names:
                names.add(name)
                return name

    values = [b.number(taken_v, digits=5) for _ in range(chains)]
    chain_vars = [[var() for _ in range(hops + 1)] for _ in range(chains)]
    statements = []
    for value, vs in zip(values, chain_vars, strict=True):
        statements.append([f" VAR {vs[0]} = {value}."] + [f" VAR {vs[k]} = VAR {vs[k - 1]}." for k in range(1, len(vs))])
    # Interleave the chains at random, each in its own order, so that every assignment follows what it copies.
    slots = b.rng.permutation(np.repeat(np.arange(chains), hops + 1)).tolist()
    cursor = [0] * chains
    inserts = []
    for c in slots:
        inserts.append(statements[c][cursor[c]])
        cursor[c] += 1
    question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                f"are assigned the value {values[0]}, they are:")
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    return b.assemble("variable_tracking", length, intro, inserts, question, " " + " ".join(chain_vars[0]))


def word_pool(encode: Encoder, decode: Callable[[list[int]], str] | None, haystack: np.ndarray) -> list[str]:
    """Distinct lowercase words of the haystack text (its first 20k tokens), else the built-in key words."""
    words: list[str] = []
    if decode is not None:
        seen: set[str] = set()
        for w in decode(haystack[:20000].tolist()).split():
            if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 10 and w not in seen:
                seen.add(w)
                words.append(w)
    return words if len(words) >= 60 else list(ADJECTIVES + NOUNS)


def frequent_words(b: _Builder, length: int, pool: list[str]) -> LongContextItem:
    """A list where one word appears most often, four runners-up clearly less often and the rest once or so.
    The list fills about 70% of the length; haystack text fills the rest."""
    words = [pool[i] for i in b.rng.permutation(len(pool))]
    top, runners, rest = words[0], words[1:5], words[5:]
    avg = float(np.mean([len(b.encode(" " + w)) for w in words[:50]]))
    n = max(10, int(0.7 * length / avg))
    c_top = max(3, n // 10)
    c_run = max(1, (c_top * 2) // 3)
    c_top = max(c_top, c_run + 1)
    fill = n - c_top - len(runners) * c_run
    uncommon = [rest[i % len(rest)] for i in range(max(fill, 0))]
    if fill > 0 and -(-fill // len(rest)) >= c_run:  # the pool is too small to keep the rest rarer
        uncommon = rest[:]
    listing = [top] * c_top + [w for w in runners for _ in range(c_run)] + uncommon
    listing = [listing[i] for i in b.rng.permutation(len(listing))]
    question = "\nQuestion: Which word appears most often in the list above? Answer: The word that appears most often is:"
    intro = "Below is some text, then a list of words. Memorize the word that appears most often in the list.\n"
    # One insert (the whole list), so the item is BOS + intro + haystack around the list + question + answer.
    fixed = 1 + len(b.encode(intro)) + len(b.encode(question)) + len(b.encode(f" {top}")) + 4  # 4: merge slack
    while (over := len(b.encode(_listing_text(listing))) + fixed - length) > 0:
        drop = [k for k in range(len(listing) - 1, -1, -1) if listing[k] != top and listing[k] not in runners]
        if not drop:
            break  # assemble() reports the length as too short
        for k in drop[:max(1, int(over / avg) + 1)]:  # drop from the end, keeping the order of the others
            del listing[k]
    return b.assemble("frequent_words", length, intro, [_listing_text(listing)], question, f" {top}")


def _listing_text(words: list[str]) -> str:
    return "\nList: " + " ".join(words) + "\n"


HAYSTACK_TOKENS = 1 << 22  # read at most this much of a split: plenty of windows, bounded memory


def haystack_tokens(tokens: np.ndarray, special: set[int]) -> np.ndarray:
    """A data split's token array [N, T] (its first 4M tokens) as one stream without BOS/EOS (they would end the
    text)."""
    rows = max(1, HAYSTACK_TOKENS // max(tokens.shape[-1], 1)) if tokens.ndim == 2 else len(tokens)
    flat = np.asarray(tokens[:rows]).reshape(-1).astype(np.int64)
    if special:
        flat = flat[~np.isin(flat, list(special))]
    if flat.size == 0:
        raise PuzzleError("the data split used as long-context haystack holds no tokens; set eval.long_context.split "
                          "to another split or add text")
    return flat


def sentence_end_ids(haystack: np.ndarray, decode: Callable[[list[int]], str] | None) -> np.ndarray | None:
    """The haystack's token ids whose text ends a sentence ('.', '!', '?'); None without a decoder."""
    if decode is None:
        return None
    ids = np.unique(haystack)
    return ids[[decode([int(i)]).rstrip().endswith((".", "!", "?")) for i in ids]]


def make_items(cfg: LongContextConfig, lengths: list[int], encode: Encoder, bos_id: int | None,
               haystack: np.ndarray, decode: Callable[[list[int]], str] | None = None
               ) -> dict[str, dict[int, list[LongContextItem]]]:
    """task -> length -> `cfg.items` items. Each item draws from its own generator seeded by (seed, task, length,
    index), so adding a task or a length leaves the other items unchanged."""
    pool = word_pool(encode, decode, haystack) if "frequent_words" in cfg.tasks else []
    ends = sentence_end_ids(haystack, decode)
    starts = None if ends is None else np.nonzero(np.isin(haystack, ends))[0] + 1  # windows start at a sentence
    out: dict[str, dict[int, list[LongContextItem]]] = {}
    for task in cfg.tasks:
        t = TASKS.index(task)
        out[task] = {}
        for length in lengths:
            items = []
            for i in range(cfg.items):
                b = _Builder(encode, bos_id, haystack, np.random.default_rng([cfg.seed, t, length, i]), ends,
                             starts)
                if task == "niah_single":
                    items.append(niah(b, length, 1, task))
                elif task == "niah_multikey":
                    items.append(niah(b, length, 4, task))
                elif task == "variable_tracking":
                    items.append(variable_tracking(b, length))
                else:
                    items.append(frequent_words(b, length, pool))
            out[task][length] = items
    return out
