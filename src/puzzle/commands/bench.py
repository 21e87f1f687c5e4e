"""`puzzle bench MODEL [MODEL ...] --workload NAME`: throughput and latency side by side (first = reference)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from puzzle.errors import PuzzleError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="model paths; the first is the reference (usually the parent)")
    parser.add_argument("--workload", action="append", default=None,
                        help="named workload (repeatable; default: all); see puzzle.workloads")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--graphs", default="auto", choices=["auto", "manual", "fused", "compile", "none"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate on each model")
    parser.add_argument("--costs", default=None, help="run dir or costs dir: compare predicted with measured")
    parser.add_argument("--costs-device", default=None, help="device key of the costs (explicit opt-in)")


def run(args: argparse.Namespace) -> int:
    from puzzle.artifacts import write_json
    from puzzle.bench import bench, format_table
    from puzzle.checkpoints import load_model
    from puzzle.costs import load_costs
    from puzzle.workloads import DEFAULT_WORKLOADS, workload_by_name

    workloads = [workload_by_name(n) for n in args.workload] if args.workload else list(DEFAULT_WORKLOADS)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                          else torch.float32)
    models, hf_models = {}, {}
    for path in args.models:
        if not Path(path).exists():
            raise PuzzleError(f"model path {path} does not exist; pass a model directory or .bin file")
        name = Path(path).name if Path(path).name not in models else path
        models[name] = load_model(path, device=args.device, dtype=dtype).eval()
        if args.hf:
            hf_models[name] = _load_hf(path, models[name], args.device, dtype)
    costs = None
    if args.costs:
        costs = {w.name: load_costs(Path(args.costs), w.name, args.costs_device) for w in workloads}
    report = bench(models, workloads, graphs=args.graphs, repeats=args.repeats, hf_models=hf_models or None,
                   costs=costs)
    print(format_table(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def _load_hf(path: str, model, device: str, dtype: torch.dtype):
    """transformers' model for the baseline: an HF directory as is, otherwise exported (remote code)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p.is_dir() and (p / "config.json").exists()):
        from puzzle.checkpoints import export_hf

        p = Path(tempfile.mkdtemp(prefix="puzzle-bench-hf-"))
        export_hf(model, p)
    return AutoModelForCausalLM.from_pretrained(p, dtype=dtype, trust_remote_code=True).to(device).eval()
