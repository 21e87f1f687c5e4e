"""The test split: no test document reaches the stages that choose or train blocks; eval reports on it.

Test documents carry bytes no other document has (upper-case marker letters). Every token id that any model
embeds while the library, score and eval stages run is recorded (a hook on `nn.Embedding.forward`), so the
check holds whatever path a stage takes to read its tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gkd_helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from puzzle.formats import save_model
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.data import SPLITS, DataConfig, document_split, load_tokens, run_data, text_key
from puzzle.stages.evaluate.stage import EvalConfig, run_eval
from puzzle.stages.library import LibraryConfig, SearchSpaceConfig, run_library
from puzzle.stages.scoring.stage import ScoreConfig, run_score

MARK = "QXZ"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "to", "an", "old", "tree", "with", "red", "blue",
         "green", "apples", "under", "seven", "stars"]
FRACTIONS = {"valid_fraction": 0.25, "test_fraction": 0.25}


class ByteTokenizer:
    vocab_size, bos_id, eos_id = 256, 1, 2

    def encode(self, text: str) -> list[int]:
        return [3 + b % 253 for b in text.encode()]


MARK_IDS = set(ByteTokenizer().encode(MARK))


def _corpus(path: Path, seed: int = 0) -> Path:
    """JSONL records: the test split's all end in MARK, no other split's contains it."""
    rng = random.Random(seed)
    records: list[str] = []
    tests = others = 0
    while tests < 12 or others < 40:
        text = " ".join(rng.choice(WORDS) for _ in range(24))
        if document_split(text_key(text), 0, **FRACTIONS) != "test":
            records.append(text)
            others += 1
            continue
        marked = f"{text} {MARK}"
        if document_split(text_key(marked), 0, **FRACTIONS) == "test":
            records.append(marked)
            tests += 1
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    return path


@pytest.fixture()
def embedded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every token id any nn.Embedding looks up from now on."""
    seen: list[int] = []
    forward = torch.nn.Embedding.forward

    def record(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        seen.extend(ids.detach().flatten().tolist())
        return forward(self, ids)

    monkeypatch.setattr(torch.nn.Embedding, "forward", record)
    return seen


def test_only_eval_reads_the_test_split(tmp_path: Path, embedded: list[int]) -> None:
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_model(build_model(tiny_llama_config(num_layers=2, vocab_size=256), seed=0), run / "parent")
    cfg = DataConfig(sources=[str(_corpus(tmp_path / "corpus.jsonl"))], seq_len=32, **FRACTIONS)
    run_data(run, cfg, tokenizer=ByteTokenizer())
    splits = {s: set(np.unique(load_tokens(run / "data", s)).tolist()) for s in SPLITS}
    assert MARK_IDS <= splits["test"] and not MARK_IDS & (splits["train"] | splits["valid"])

    run_library(run, LibraryConfig(tokens_per_variant=2 * 4 * 32, batch_size=4, init_batches=1, valid_batches=1,
                                   progress=False, device="cpu",
                                   search_space=SearchSpaceConfig(ffn_fractions=[0.5], round_to=16,
                                                                  attention_kv_heads=[1])))
    assert embedded and not MARK_IDS & set(embedded), "BLD embedded a test token"
    embedded.clear()

    run_score(run, ScoreConfig(num_sequences=1000, batch_size=8, device="cpu"))  # every valid sequence
    assert embedded and not MARK_IDS & set(embedded), "scoring embedded a test token"
    embedded.clear()

    result = run_eval(run, EvalConfig(max_sequences=5, batch_size=4, throughput=False, device="cpu"))
    assert MARK_IDS <= set(embedded), "eval did not read the test split"
    on_disk = json.loads((run / "eval" / "eval.json").read_text())
    assert on_disk["split"] == result["split"] == "test"
    assert on_disk["sequences"] == 5 and on_disk["seq_len"] == 32
