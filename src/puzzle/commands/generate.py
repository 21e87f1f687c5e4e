"""`puzzle generate MODEL --prompt TEXT`: generate text, printing tokens as they come."""

from __future__ import annotations

import argparse
import sys

import torch

from puzzle.commands.argtypes import dtype_arg, positive_int
from puzzle.core.dtypes import torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.formats import load_model
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.runtime import SamplingConfig, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (native or Hugging Face), llama2.c .bin or llama.cpp .gguf file")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=dtype_arg, default=None,
                        help="bfloat16 (bf16), float16 (fp16) or float32 (fp32); default: bfloat16 on GPU, else float32")
    parser.add_argument("--graphs", default="auto", choices=["auto", "fused", "manual", "none"])


def run(args: argparse.Namespace) -> int:
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                          else torch.float32)
    model = load_model(args.model, device=args.device, dtype=dtype).eval()
    tok = load_tokenizer(args.tokenizer or args.model)
    prompts = []
    for text in args.prompt:
        ids = tok.encode(text)
        if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id, *ids]
        prompts.append(ids)
    eos = model.config.eos_token_id
    stops = [tok.eos_id] if tok.eos_id is not None else []
    stops += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    streamed: list[list[int]] = [[] for _ in prompts]
    printed = [""] * len(prompts)

    def on_token(step: int, tokens: list[int], done: list[bool]) -> None:
        if len(prompts) != 1:
            return  # a batch is printed at the end; only a single prompt streams
        if tokens[0] in stops:
            return
        streamed[0].append(tokens[0])
        text = tok.decode(streamed[0])
        sys.stdout.write(text[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = text

    if len(prompts) == 1:
        sys.stdout.write(args.prompt[0])
    result = generate(model, prompts, args.max_new_tokens, sampling, stop_tokens=stops, seed=args.seed,
                      on_token=on_token, graphs=args.graphs)
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for text, tokens in zip(args.prompt, result.tokens):
            print(f"--- {text}{tok.decode(tokens)}")
    print(f"[{sum(map(len, result.tokens))} tokens, first after {result.ttft_s * 1e3:.0f} ms, "
          f"{result.inter_token_s * 1e3:.1f} ms/token]", file=sys.stderr)
    if not result.tokens:
        raise PuzzleError("nothing was generated")
    return 0
