"""A GGUF parent's task accuracy as puzzle loads it next to stock transformers' own GGUF loading.

Both score the same items with the same code (`puzzle.stages.evaluate.tasks`, the scoring `puzzle eval` uses),
each with its own tokenizer read from the file, so any difference comes from how the file was read:

    python benchmarks/gguf_stock_tasks.py FILE.gguf --tasks ../shared/data/tasks/hellaswag_val.txt.bz2:2000 \
        ../shared/data/tasks/lambada_test.jsonl ../shared/data/tasks/piqa_valid.jsonl --json OUT.json

Needs `gguf` and, for transformers' loader, `accelerate`. Runs on CUDA when present (fp32 either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _meta import metadata

from puzzle.formats import load_model
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.stages.evaluate.tasks import TaskSpec, evaluate_task, load_task, task_names


def stock_model(gguf: Path, device: torch.device) -> tuple[Any, Any]:
    """transformers' own GGUF model and tokenizer (wrapped as puzzle's: encode without special tokens, bos_id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    class Stock:
        bos_id = tok.bos_token_id

        @staticmethod
        def encode(text: str) -> list[int]:
            return list(tok.encode(text, add_special_tokens=False))

    return model.to(device).eval(), Stock()


def score(logits_fn: Any, tasks: dict[str, Any], tokenizer: Any, device: torch.device, max_len: int,
          batch_tokens: int) -> dict[str, Any]:
    out = {}
    for name, items in tasks.items():
        start = time.perf_counter()
        out[name] = evaluate_task(items, logits_fn, tokenizer.encode, tokenizer.bos_id, device, 1, max_len,
                                  max_tokens=batch_tokens)
        out[name]["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tasks", nargs="+", required=True, help="task files, each optionally PATH:LIMIT")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = []
    for t in args.tasks:
        path, _, limit = t.partition(":")
        specs.append(TaskSpec(path, limit=int(limit) if limit else None))
    tasks = {name: load_task(spec) for name, spec in zip(task_names(specs), specs, strict=True)}
    tokenizer = load_tokenizer(args.gguf)  # the tokenizer puzzle builds from the file's metadata
    ours = load_model(args.gguf, device=device, dtype=torch.float32).eval()
    max_len = ours.config.max_position_embeddings
    with torch.no_grad():
        result = {"puzzle": score(lambda ids, model=ours: model(ids).logits, tasks, tokenizer, device, max_len,
                                  args.batch_tokens)}
        del ours
        stock, stock_tokenizer = stock_model(args.gguf, device)
        result["transformers"] = score(lambda ids: stock(ids).logits, tasks, stock_tokenizer, device, max_len,
                                       args.batch_tokens)
    report = {"meta": metadata(), "gguf": str(args.gguf), "items": {n: len(v) for n, v in tasks.items()},
              "device": str(device), "dtype": "float32", **result}
    for name in tasks:
        a, b = result["puzzle"][name], result["transformers"][name]
        keys = [k for k in ("accuracy", "acc_norm") if k in a]
        print(name, "  ".join(f"{k}: puzzle {a[k]:.4f} transformers {b[k]:.4f}" for k in keys))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
