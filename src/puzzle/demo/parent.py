"""Build the demo's parent: corpus -> tokenizer -> packed tokens -> a tiny Llama trained from scratch.

The parent is saved as a plain HF `LlamaForCausalLM` directory, so that the pipeline imports it exactly as it
would import a user's model. Every step reuses its output when it exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

from puzzle.demo.corpus import write_stdlib_corpus
from puzzle.demo.pretrain import PretrainConfig, pretrain
from puzzle.demo.tokenizer import train_tokenizer
from puzzle.formats import export_hf
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.model.blocks import ModelConfig, uniform_blocks
from puzzle.model.decoder import build_model
from puzzle.stages.data import DataConfig, load_tokens, run_data


def demo_parent_config(vocab_size: int) -> ModelConfig:
    """6 layers, hidden 128, 8 heads of 16 (8 KV heads, so 8/4/2/1 are all candidates), SwiGLU 384."""
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=128, num_attention_heads=8, blocks=uniform_blocks(6, 8, 384),
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )


def build_demo_parent(work_dir: Path, pretrain_cfg: PretrainConfig, seq_len: int = 128) -> tuple[Path, Path]:
    """Returns (parent model directory, corpus directory)."""
    corpus = write_stdlib_corpus(work_dir / "corpus")
    parent_dir = work_dir / "parent-model"
    if (parent_dir / "config.json").is_file():
        return parent_dir, corpus
    tokenizer_dir = train_tokenizer(corpus, work_dir / "tokenizer")
    run_data(work_dir / "pretrain", DataConfig(sources=[str(corpus)], seq_len=seq_len + 1), tokenizer_dir)
    tokens = load_tokens(work_dir / "pretrain" / "data", "train")
    model = build_model(demo_parent_config(load_tokenizer(tokenizer_dir).vocab_size), seed=pretrain_cfg.seed)
    print(f"demo: pretraining a {model.config.param_count() / 1e6:.2f}M-parameter parent on "
          f"{tokens.size / 1e6:.2f}M tokens of standard-library text", file=sys.stderr)
    checkpoint = work_dir / "pretrain" / "checkpoint.pt"  # an interrupted demo resumes pretraining from here
    losses = pretrain(model, tokens, pretrain_cfg, checkpoint=checkpoint)
    print(f"demo: parent loss {losses[0]:.2f} -> {sum(losses[-20:]) / min(20, len(losses)):.2f}", file=sys.stderr)
    export_hf(model, parent_dir, tokenizer_source=tokenizer_dir, format="llama")
    checkpoint.unlink(missing_ok=True)
    return parent_dir, corpus
