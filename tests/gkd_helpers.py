"""Tiny parent / damaged child / token arrays shared by the uptrain, evaluation and report tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from puzzle.core.distributed import DistInfo
from puzzle.model.decoder import PuzzleModel, build_model
from puzzle.model.presets import tiny_llama_config

VOCAB = 64


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add barrier waits, which explode on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SEQ = 16
CPU1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))  # one process, no group


class Killed(Exception):
    """Stands for the process being killed: raised from train_gkd's on_step by `kill_after`."""


def kill_after(step: int) -> Callable[[int, dict], None]:
    """An on_step callback that ends the run (raises Killed) once `step` is done."""
    def on_step(done: int, record: dict) -> None:
        if done == step:
            raise Killed
    return on_step


def tiny_parent(seed: int = 0, vocab: int = VOCAB) -> PuzzleModel:
    model = build_model(tiny_llama_config(num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
                                          intermediate_size=64, vocab_size=vocab), seed=seed)
    # A larger init than Llama's 0.02 gives the random parent peaked, input-dependent predictions,
    # so that a damaged child is measurably far from it.
    model.init_weights(std=0.15, generator=torch.Generator().manual_seed(seed))
    return model


def damaged_child(parent: PuzzleModel, layers: tuple[int, ...] = (1, 2)) -> PuzzleModel:
    """The parent with no-op attention in `layers` (the rest copied)."""
    child = copy.deepcopy(parent)
    for i in layers:
        child.set_layer(i, None, child.layers[i].ffn)
    return child


def token_arrays(n_train: int = 64, n_valid: int = 16, seq: int = SEQ, vocab: int = VOCAB,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, vocab, size=(n_train, seq), dtype=np.int64),
            rng.integers(0, vocab, size=(n_valid, seq), dtype=np.int64))


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte, offset by 2 (0 = pad, 1 = BOS)."""

    bos_id: int | None = 1
    eos_id: int | None = None
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


_LINES = (
    "The cat sat on the mat. The dog sat on the log. A bird sang in the tree and the sun rose over the hill.",
    "Once upon a time there was a little girl who liked to read books about the sea and the stars.",
)
# Numbered, so every line is its own document: identical lines would all land in one data split.
CORPUS = "".join(f"{line} ({i})\n" for i in range(40) for line in _LINES)


def make_run_dir(root: Path, vocab: int = 300) -> tuple[Path, PuzzleModel]:
    """A run directory with a tiny parent (trained BPE tokenizer), packed data and one damaged child."""
    from puzzle.demo.tokenizer import train_tokenizer
    from puzzle.formats import export_hf, save_model
    from puzzle.stages.data import DataConfig, run_data

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "text.txt").write_text(CORPUS)
    tok_dir = train_tokenizer(corpus, root / "tokenizer", vocab_size=vocab)
    run = root / "run"
    parent = tiny_parent(vocab=vocab)
    save_model(parent, run / "parent", tokenizer_source=tok_dir)
    run_data(run, DataConfig(sources=[str(corpus)], seq_len=16, valid_fraction=0.3, test_fraction=0.2,
                             txt_documents="lines"))
    export_hf(damaged_child(parent), run / "children" / "noattn12", tokenizer_source=tok_dir)
    return run, parent
