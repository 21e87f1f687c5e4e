"""`puzzle bench MODEL [MODEL ...] --workload NAME`: throughput and latency side by side (first = reference)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from puzzle.commands.argtypes import dtype_arg, positive_int
from puzzle.core.artifacts import read_json, write_json
from puzzle.core.dtypes import torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import clear_warnings, warn
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import DEFAULT_WORKLOADS, resolve_workloads, run_workloads
from puzzle.costs.schema import load_costs
from puzzle.costs.table import predict
from puzzle.formats import export_hf, load_model
from puzzle.formats.native import is_native_config
from puzzle.runtime import bench as runtime_bench  # the module: a test stands in for its `bench`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="model paths; the first is the reference (usually the parent)")
    parser.add_argument("--workload", action="append", default=None,
                        help="named workload (repeatable): " + ", ".join(
                            f"{w.name} (batch {w.batch_size}, {w.prompt_len}+{w.gen_len} tokens)"
                            for w in DEFAULT_WORKLOADS)
                        + ", or one of the --costs run's workloads; default: all of them")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=dtype_arg, default=None,
                        help="bfloat16 (bf16), float16 (fp16) or float32 (fp32); default: bfloat16 on GPU, else float32")
    parser.add_argument("--graphs", default="auto", choices=["auto", "fused", "manual", "none"])
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="timed generations per model and workload; the first warms up (default 2)")
    parser.add_argument("--hf", action="store_true", help="also time transformers' generate on each model")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="--hf: let transformers run the Python code a model directory ships (auto_map); "
                             "only for directories you trust")
    parser.add_argument("--costs", default=None, help="run dir or costs dir: compare predicted with measured")
    parser.add_argument("--costs-device", default=None, help="device key of the costs (explicit opt-in)")


def run(args: argparse.Namespace) -> int:
    # A run's workloads (its config's top-level `workloads:`) are the shapes its costs were measured for.
    run_costs = args.costs is not None and RunDir(args.costs).config.is_file()
    known = run_workloads(args.costs) if run_costs else list(DEFAULT_WORKLOADS)
    if args.workload:
        workloads = resolve_workloads(args.workload, known)
    else:
        workloads = known
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                          else torch.float32)
    for path in args.models:  # every path checked before any model loads
        if not Path(path).exists():
            raise PuzzleError(f"model path {path} does not exist; pass a model directory or .bin file")
        if args.hf:
            trusted_hf_dir(Path(path), args.trust_remote_code)
    models, hf_models = {}, {}
    for path in args.models:
        name = Path(path).name if Path(path).name not in models else path
        models[name] = load_model(path, device=args.device, dtype=dtype).eval()
        if args.hf:
            hf_models[name] = _load_hf(path, models[name], args.device, dtype, args.trust_remote_code)
    costs = None
    if args.costs:
        costs = {w.name: load_costs(Path(args.costs), w.name, args.costs_device) for w in workloads}
    report = runtime_bench.bench(models, workloads, graphs=args.graphs, repeats=args.repeats,
                                 hf_models=hf_models or None,
                                 predict=(lambda config, w: predict(config, costs[w.name], w)) if costs else None)
    run_dir = Path(args.costs) if args.costs and RunDir(args.costs).costs.is_dir() else None
    if run_dir is None:
        print(runtime_bench.format_table(report))  # warnings as lines of the table
    else:  # the run keeps the warnings for its summary; `warn` prints them
        print(runtime_bench.format_table({**report, "warnings": []}))
        clear_warnings(run_dir, "bench")
        for message in report["warnings"]:
            warn(run_dir, "bench", message)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def remote_code_reason(path: Path) -> str | None:
    """Why transformers would run Python code shipped in the directory (None: it would not)."""
    # local, as below: transformers takes seconds to import and only --hf needs it
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = read_json(RunDir.model_config(path))
    if config.get("auto_map"):
        return "its config.json maps transformers' Auto classes to code in the directory (auto_map)"
    if config.get("model_type") not in CONFIG_MAPPING:
        return f"transformers does not know its model_type {config.get('model_type')!r}"
    return None


def _is_hf_dir(path: Path) -> bool:
    """A directory transformers loads as it is (a native puzzle directory or a llama2.c file is not one)."""
    config = RunDir.model_config(path)
    return path.is_dir() and config.exists() and not is_native_config(read_json(config))


def trusted_hf_dir(path: Path, trust_remote_code: bool) -> bool:
    """Whether transformers may run the code an HF directory ships; an error when it needs to and
    --trust-remote-code was not given. Not an HF directory (`--hf` exports it itself): False."""
    if not _is_hf_dir(path):
        return False
    reason = remote_code_reason(path)
    if reason and not trust_remote_code:
        raise PuzzleError(f"--hf would run model code shipped in {path} ({reason}); pass --trust-remote-code if "
                          "you trust that directory, or bench without --hf")
    return reason is not None


def _load_hf(path: str, model, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """transformers' model for the baseline: an HF directory as is (its own code only with
    --trust-remote-code, checked by `trusted_hf_dir`), otherwise exported by this package into a temporary
    directory (whose remote code this package wrote)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if _is_hf_dir(p):
        trust = trusted_hf_dir(p, trust_remote_code)
    else:
        p = Path(tempfile.mkdtemp(prefix="puzzle-bench-hf-"))
        export_hf(model, p)
        trust = True  # the code in p is this package's own export
    try:
        hf = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, trust_remote_code=trust)
    except (OSError, ValueError, KeyError, AttributeError, ImportError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise PuzzleError(f"--hf: transformers cannot load {path} ({type(e).__name__}: {first}); bench without "
                          "--hf, or export it with `puzzle export` and bench the exported directory") from None
    return hf.to(device).eval()
