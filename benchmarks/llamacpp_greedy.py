"""llama.cpp runs our GGUF export as we do: greedy tokens from llama.cpp (llama-cpp-python) equal our runtime's.

A benchmark, not a CI test: it needs `pip install llama-cpp-python` (which compiles llama.cpp). The model is a
heterogeneous child exported as llama.cpp's `deci` layout (GQA with 1, 2 and 4 KV heads, linear attention,
no-op attention, no-op layer, FFN sizes that ffn_mult cannot express), or `--model PATH` (anything puzzle reads,
e.g. a run's child). The built-in child has random weights scaled so that logits have clear margins (greedy then
tests the layout, not float16 rounding) and a byte-level BPE tokenizer trained on a small corpus, so that
llama.cpp's vocabulary is a real one. Both sides start from the same token ids and read float16 weights.

    python benchmarks/llamacpp_greedy.py [--model PATH] [--prompts 8] [--new 32] [--type f16]

Writes benchmarks/results/llamacpp_greedy.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
from pathlib import Path

import numpy as np
import torch
from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.demo.corpus import write_stdlib_corpus
from puzzle.demo.tokenizer import train_tokenizer
from puzzle.formats import load_model
from puzzle.formats.gguf_export import export_gguf
from puzzle.formats.tokenizers import has_tokenizer, load_tokenizer
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.runtime.generate import generate

CHILD = [BlockConfig(AttentionConfig.gqa(4), FFNConfig.swiglu(512)),
         BlockConfig(AttentionConfig.gqa(1), FFNConfig.swiglu(352)),
         BlockConfig(AttentionConfig.linear(), FFNConfig.swiglu(256)),
         BlockConfig(AttentionConfig.no_op(), FFNConfig.swiglu(160)),
         BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op()),
         BlockConfig(AttentionConfig.gqa(2), FFNConfig.swiglu(512))]


def builtin_child(work: Path) -> tuple[torch.nn.Module, Path]:
    corpus = write_stdlib_corpus(work / "corpus", max_bytes=300_000)
    tok_dir = train_tokenizer(corpus, work / "tokenizer", vocab_size=512)
    vocab = load_tokenizer(tok_dir).vocab_size
    cfg = tiny_llama_config(num_layers=len(CHILD), hidden_size=128, num_heads=4, num_kv_heads=4,
                            intermediate_size=512, vocab_size=vocab, max_position_embeddings=512,
                            bos_token_id=1, eos_token_id=2)
    model = build_model(cfg.with_blocks(CHILD), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # std 0.02 -> ~1/sqrt(fan-in): activations and logits of order one and more
                p.mul_({"embed_tokens.weight": 2.5, "lm_head.weight": 50.0}.get(name, 4.0))
    return model, tok_dir


def ours_greedy(model: torch.nn.Module, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [generate(model, [p], new, graphs="none").tokens[0] for p in prompts]


def llamacpp_greedy(path: Path, prompts: list[list[int]], new: int) -> list[list[int]]:
    from llama_cpp import Llama  # the benchmark's one extra dependency

    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    out = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            llm.eval([token])
        out.append(tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="any model puzzle reads (default: the built-in child)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0"])
    ap.add_argument("--out", default="benchmarks/results/llamacpp_greedy.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            model = load_model(args.model)
            tok = args.model if has_tokenizer(args.model) else None
        else:
            model, tok = builtin_child(work)
        model = model.float().eval()
        path = work / "child.gguf"
        info = export_gguf(model, path, tokenizer_source=tok, gguf_type=args.type)
        # our side reads the weights llama.cpp reads: rounded to float16 (the norms stay float32 in both)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2 and args.type == "f16":
                    p.copy_(p.half().float())
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, model.config.vocab_size, size=int(rng.integers(4, 24))).tolist()
                   for _ in range(args.prompts)]
        ours = ours_greedy(model, prompts, args.new)
        theirs = llamacpp_greedy(path, prompts, args.new)
    same = [a == b for a, b in zip(ours, theirs)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, theirs)]
    result = {"model": args.model or "built-in child", "blocks": [b.name for b in model.config.blocks],
              "gguf": info, "prompts": len(prompts), "new_tokens": args.new, "identical_rows": sum(same),
              "first_difference": first_diff, "ours": ours, "llama_cpp": theirs,
              "llama_cpp_python": importlib.metadata.version("llama-cpp-python"), "meta": metadata()}
    print(f"{sum(same)}/{len(same)} prompts: llama.cpp's greedy tokens equal ours ({info['architecture']}, "
          f"{args.type}); first differences: {first_diff}")
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
