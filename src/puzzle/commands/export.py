"""`puzzle export MODEL OUT [--format nemotron-nas|llama|gguf] [--engine NAME]`: a Hugging Face directory, or a GGUF
file for llama.cpp / Ollama (`--gguf-type f16|bf16|q8_0`)."""

from __future__ import annotations

import argparse
import sys

from puzzle.commands.argtypes import dtype_arg, shard_size
from puzzle.core.dtypes import torch_dtype
from puzzle.formats import export_hf, load_model
from puzzle.formats.engines import ENGINES, require_servable
from puzzle.formats.export import EXPORT_FORMATS
from puzzle.formats.gguf_export import GGUF_FIX, GGUF_TYPES, export_gguf
from puzzle.formats.tokenizers import has_tokenizer, load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="any model this package reads (native, HF, Nemotron-NAS, llama2.c, GGUF)")
    parser.add_argument("out_dir", help="directory to write (replaced atomically); for --format gguf, the file")
    parser.add_argument("--format", choices=(*EXPORT_FORMATS, "gguf"), default="nemotron-nas",
                        help="nemotron-nas (any child; loads with trust_remote_code), llama (homogeneous only) or "
                             "gguf (llama.cpp: 'llama' when homogeneous, else 'deci')")
    parser.add_argument("--engine", action="append", default=[], metavar="NAME",
                        help=f"refuse the export unless this engine can serve the model ({', '.join(ENGINES)}); "
                             "repeatable")
    parser.add_argument("--dtype", type=dtype_arg, default=None,
                        help="weight dtype: bfloat16 (bf16), float16 (fp16) or float32 (fp32); default: as stored")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16", help="GGUF matrix type (default f16)")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB",
                        help="largest safetensors shard, e.g. 2GB or 500MB")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    # Checked before anything is written: an export no named engine can load is an error, not a file.
    require_servable(model.config, args.engine, "search again with search.serve_with naming the engine, or export "
                     "for another engine (puzzle inspect lists which serve it)",
                     homogeneous_as_llama=args.format != "nemotron-nas")
    if args.format == "gguf":
        require_servable(model.config, ["llama.cpp"], GGUF_FIX)
    # A model without a tokenizer still exports (say so); one whose tokenizer does not load is an error.
    tokenizer = load_tokenizer(args.model) if has_tokenizer(args.model) else None
    if tokenizer is None:
        print(f"puzzle export: note: {args.model} has no tokenizer; exporting without one", file=sys.stderr)
    if args.format == "gguf":
        info = export_gguf(model, args.out_dir, tokenizer_source=tokenizer, gguf_type=args.gguf_type)
        print(f"wrote {args.out_dir} (gguf: {info['architecture']}, {info['type']}, tokenizer {info['tokenizer']})")
        return 0
    out = export_hf(model, args.out_dir, tokenizer_source=tokenizer, format=args.format,
                    max_shard_size=args.max_shard_size, dtype=torch_dtype(args.dtype) if args.dtype else None)
    print(f"wrote {out} ({args.format})")
    return 0
