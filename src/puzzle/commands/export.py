"""`puzzle export MODEL OUT_DIR [--format nemotron-nas|llama]`: write a normal Hugging Face directory."""

from __future__ import annotations

import argparse
import sys

from puzzle.commands.argtypes import dtype_arg, shard_size
from puzzle.core.dtypes import torch_dtype
from puzzle.formats import export_hf, load_model
from puzzle.formats.export import EXPORT_FORMATS
from puzzle.formats.tokenizers import has_tokenizer, load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="any model this package reads (native, HF, Nemotron-NAS, llama2.c)")
    parser.add_argument("out_dir", help="directory to write (replaced atomically)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="nemotron-nas",
                        help="nemotron-nas (any child; loads with trust_remote_code) or llama (homogeneous only)")
    parser.add_argument("--dtype", type=dtype_arg, default=None,
                        help="weight dtype: bfloat16 (bf16), float16 (fp16) or float32 (fp32); default: as stored")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB",
                        help="largest safetensors shard, e.g. 2GB or 500MB")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    # A model without a tokenizer still exports (say so); one whose tokenizer does not load is an error.
    tokenizer = load_tokenizer(args.model) if has_tokenizer(args.model) else None
    if tokenizer is None:
        print(f"puzzle export: note: {args.model} has no tokenizer; exporting without one", file=sys.stderr)
    out = export_hf(model, args.out_dir, tokenizer_source=tokenizer, format=args.format,
                    max_shard_size=args.max_shard_size, dtype=torch_dtype(args.dtype) if args.dtype else None)
    print(f"wrote {out} ({args.format})")
    return 0
