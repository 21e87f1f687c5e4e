"""A tiny HF Llama parent with a trained BPE tokenizer and a text corpus, and run configs for `puzzle run`.

Shared by the end-to-end pipeline tests: everything is small enough that every stage runs in seconds on CPU.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from puzzle.demo.tokenizer import train_tokenizer
from puzzle.formats import export_hf
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config

NUM_LAYERS = 2
WORKLOAD = "tg"
_TEXT = ("the quick brown fox jumps over a lazy dog while the cat sat on the mat and ran to an old tree "
         "with red blue green apples under seven bright stars")
_WORDS = _TEXT.split(" ")


def write_corpus(out: Path, documents: int = 40, lines: int = 30, seed: int = 0) -> Path:
    """`documents` small .txt files of seeded pseudo-sentences."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for d in range(documents):
        text = "\n".join(" ".join(rng.choice(_WORDS) for _ in range(12)) + "." for _ in range(lines))
        (out / f"doc{d:02d}.txt").write_text(text + "\n")
    return out


def make_parent(root: Path) -> tuple[Path, Path]:
    """(HF Llama parent dir with tokenizer, corpus dir) under `root`."""
    corpus = write_corpus(root / "corpus")
    tok_dir = train_tokenizer(corpus, root / "tokenizer", vocab_size=300)
    tok = load_tokenizer(tok_dir)
    config = tiny_llama_config(num_layers=NUM_LAYERS, hidden_size=32, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                               eos_token_id=tok.eos_id)
    model = build_model(config, seed=0)
    # A larger init than Llama's 0.02 gives peaked, input-dependent predictions: children differ measurably.
    model.init_weights(std=0.15, generator=torch.Generator().manual_seed(0))
    parent = export_hf(model, root / "parent-hf", tokenizer_source=tok_dir, format="llama")
    return Path(parent), corpus


def run_config(parent: Path, corpus: Path, run_dir: Path) -> dict[str, Any]:
    """A `puzzle run` config with tiny budgets everywhere (the whole pipeline in a few seconds)."""
    return {
        "run_dir": str(run_dir),
        "parent": str(parent),
        "data": {"sources": [str(corpus)], "seq_len": 32, "valid_fraction": 0.2},
        "library": {"tokens_per_variant": 2048, "batch_size": 4, "init_batches": 1, "valid_batches": 1,
                    "progress": False, "search_space": {"ffn_fractions": [1.0, 0.5], "round_to": 16}},
        "score": {"num_sequences": 8, "batch_size": 8},
        "workloads": [{"name": WORKLOAD, "batch_size": 8, "prompt_len": 32, "gen_len": 32}],
        "costs": {"mode": "estimate"},
        "search": {"constraints": [{"kind": "throughput", "target": "1.3x", "workload": WORKLOAD}],
                   "time_limit_s": 10},
        "realize": {"max_children": 1},
        "uptrain": {"steps": 3, "micro_batch_size": 4, "warmup_steps": 1, "val_every": 0, "val_batches": 1,
                    "checkpoint_every": 0, "device": "cpu"},
        "eval": {"max_sequences": 8, "workloads": [WORKLOAD], "device": "cpu"},
        "report": {"plots": False},
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root` (hidden ones too): relative path -> (mtime_ns, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}
