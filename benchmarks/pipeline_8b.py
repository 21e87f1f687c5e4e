"""The whole `puzzle run` pipeline at Llama-3.1-8B scale on one GPU: wall time, tokens/s and peak GPU memory
per stage, and a projection to Llama-3.1-70B on 8 GPUs (`_pipeline_projection.py`).

    PYTHONPATH=src python benchmarks/pipeline_8b.py --out $OUT/pipeline_8b.json --work /tmp/p8b  # one H200
    python benchmarks/pipeline_8b.py --shape tiny --data tests/... --out /tmp/p8b_tiny.json        # CPU, seconds

The parent is a random-weight HF `LlamaForCausalLM` of the 8B shape (hidden 4096, 32 layers, 32/8 heads,
SwiGLU 14336, vocab 128256, rope theta 500000, 8192 positions), initialised on the GPU in bf16 and written
with `save_pretrained` (~16 GB), with a byte-level BPE tokenizer trained on the run's text (its ids fit the
vocabulary). Every stage then runs in this process, one at a time (`run_pipeline(cfg, start=s, until=s)`),
with the CUDA peak-memory counters reset before each. Stage tokens: data = tokens written; library =
training tokens each variant sees (the parent's forward tokens per wave); score = scored sequences' tokens x
candidates; uptrain = training tokens; eval = test tokens x models.

The config is configs/llama31-8b-h200.yaml cut to finish in minutes: a decoupled library for every layer in
memory-sized waves, a smaller search space than the default (the default's 32-layer library is ~62 GB of
bf16 weights, which with the parent does not fit a 64 GB disk; `--space full` asks for it anyway), few
tokens everywhere, one child. `--free-disk` deletes the HF source after import and the library's weights
after realize (later stages read only its JSON). `--from/--until` run part of the stages; rows already in
`--out` for the other stages are kept, so a run can be split over two calls on a warm machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _meta import metadata
from _pipeline_projection import project_70b, stage_table

from puzzle.core.artifacts import read_json, write_json
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.demo.tokenizer import train_tokenizer
from puzzle.formats.loading import SIDECAR
from puzzle.pipeline import STAGES, load_run_config, run_pipeline, select_stages
from puzzle.stages.data import source_files

GIB = 2**30
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256, "rope_theta": 500000.0,
           "max_position_embeddings": 8192},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 512, "rope_theta": 500000.0, "max_position_embeddings": 256},
}
SHARED_TEXT = ["../shared/data/text/gutenberg", "../shared/data/text/tinyshakespeare.txt",
               "../shared/data/text/tinystories_sample.txt"]
TOKENIZER_VOCAB = {"8b": 8192, "tiny": 384}
# GPU bytes per trainable BLD parameter: fp32 weight, grad and two AdamW moments (16) + headroom for the
# wave's parent activations, calibration statistics and the allocator (4).
BLD_BYTES_PER_PARAM = 20


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def train_bpe(sources: list[str], out_dir: Path, vocab_size: int) -> Path:
    """The demo's byte-level BPE tokenizer trained on the run's .txt sources (folders recursively); reused."""
    return train_tokenizer([f for f in source_files(sources) if f.suffix == ".txt"], out_dir, vocab_size)


def make_parent(shape: str, out: Path, tokenizer_dir: Path, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random-weight HF Llama of `shape` + tokenizer in `out` (reused when complete); what was built and how long."""
    from transformers import LlamaConfig, LlamaForCausalLM

    done = out / "parent_done.json"
    if done.is_file():
        return {**read_json(done), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(torch.bfloat16):  # no fp32 copy, no slow CPU init at 8B
        model = LlamaForCausalLM(config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    info = {"shape": shape, **SHAPES[shape], "params": sum(p.numel() for p in model.parameters()),
            "init_s": round(init_s, 2), "save_s": round(time.perf_counter() - t0, 2),
            "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    del model
    free_gpu()
    write_json(done, info)
    return info


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def space_config(space: str, kv_heads: int) -> dict[str, Any]:
    """'small': the parent's KV heads and a quarter of them, FFN at 100/50/25% (+ linear and no-op of both)."""
    if space == "full":
        return {}
    return {"attention_kv_heads": sorted({kv_heads, max(1, kv_heads // 4)}, reverse=True),
            "ffn_fractions": [1.0, 0.5, 0.25]}


def wave_params(shape: str, parent_params: int) -> int:
    """Trainable BLD parameters per wave that fit beside the bf16 parent in 75% of this GPU (0 = no limit)."""
    if not torch.cuda.is_available() or shape == "tiny":
        return 0
    budget = 0.75 * torch.cuda.get_device_properties(0).total_memory - 2 * parent_params
    return max(int(budget / BLD_BYTES_PER_PARAM), 100_000_000)


def run_config(args: argparse.Namespace, run_dir: Path, parent: Path, parent_params: int) -> dict[str, Any]:
    """configs/llama31-8b-h200.yaml with budgets cut to minutes (the tiny shape: seconds on CPU)."""
    tiny = args.shape == "tiny"
    seq = args.seq_len or (32 if tiny else 1024)
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir), "parent": str(parent),
        "data": {"sources": list(args.data), "seq_len": seq, "valid_fraction": 0.05, "test_fraction": 0.05,
                 "txt_documents": "file" if tiny else "paragraphs"},
        "library": {"tokens_per_variant": args.tokens_per_variant or (2048 if tiny else 32768),
                    "batch_size": 4, "lr": 1e-4, "init_batches": 1, "valid_batches": 1, "progress": False,
                    "max_params_per_wave": args.max_params_per_wave if args.max_params_per_wave is not None
                    else wave_params(args.shape, parent_params),
                    "search_space": {"round_to": 16 if tiny else 256, **space_config(args.space, SHAPES[args.shape]["num_key_value_heads"])}},
        "score": {"num_sequences": args.score_sequences, "batch_size": args.score_sequences,
                  "candidates_per_batch": 4, "dtype": "float32" if tiny else "bfloat16"},
        # costs: the default workloads (no `workloads:` key), timed with fewer repeats
        "costs": {"repeats": 3, "warmup": 1, "input_sets": 1, "consistency_remeasure": 0},
        "search": {"constraints": [{"kind": "throughput", "target": "1.3x" if tiny else "1.5x",
                                    "workload": "text-generation"},
                                   *([] if tiny else [{"kind": "params", "target": args.max_child_params}])],
                   "num_solutions": 1, "baselines": False, "verify_rounds": 0, "time_limit_s": 30},
        "realize": {"max_children": 1},
        "uptrain": {"steps": args.uptrain_steps, "micro_batch_size": 1 if not tiny else 4, "grad_accum": 1,
                    "lr": 5e-5, "warmup_steps": 2, "val_every": 0, "val_batches": 2, "checkpoint_every": 0},
        "eval": {"max_sequences": args.eval_sequences, "batch_size": min(args.eval_sequences, 8),
                 "throughput": bool(args.eval_throughput), "workloads": ["batch1"]},
        "report": {"plots": False},
    }
    if tiny:
        cfg["costs"]["mode"] = "estimate"
        cfg["uptrain"]["device"] = cfg["eval"]["device"] = "cpu"
    return cfg


# ---- what each stage processed -----------------------------------------------------------------------------


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _trained_entries(index_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A library index (empty when absent) and its entries that trained (tokens > 0)."""
    index = _json(index_path) or {"entries": []}
    return index, [e for e in index["entries"] if e["metrics"].get("tokens", 0) > 0]


def _param_tokens(entries: list[dict[str, Any]]) -> int:
    """Parameters x training tokens, summed: BLD's work, comparable across waves and stages."""
    return sum(e["metrics"]["params"] * e["metrics"]["tokens"] for e in entries)


def add_rates(row: dict[str, Any], wall: float) -> None:
    """tokens/s and parameter-tokens/s of a stage row over `wall` seconds, where it has that work."""
    if row.get("tokens"):
        row["tokens_per_s"] = round(row["tokens"] / wall, 1)
    if row.get("param_tokens"):
        row["param_tokens_per_s"] = row["param_tokens"] / wall


def stage_work(stage: str, run: RunDir, cfg: Any) -> dict[str, Any]:
    """Tokens (and, for BLD, trained parameters) a stage processed, read back from its artifacts."""
    if stage == "data":
        manifest = _json(run.data_manifest) or {}
        splits = manifest.get("splits", {})
        tokens = sum(int(s.get("tokens", 0)) for s in splits.values()) if isinstance(splits, dict) else None
        return {"tokens": tokens or None}
    if stage == "library":
        index, trained = _trained_entries(run.library_index)
        per_variant = max((e["metrics"]["tokens"] for e in trained), default=0)
        return {"tokens": per_variant, "entries": len(index["entries"]), "trained_variants": len(trained),
                "trained_params": sum(e["metrics"]["params"] for e in trained),
                "variant_tokens": sum(e["metrics"]["tokens"] for e in trained),
                "param_tokens": _param_tokens(trained),
                "waves": len({(e["metrics"]["wall_s"], e["metrics"]["wave_items"]) for e in index["entries"]}),
                "max_params_per_wave": cfg.library.max_params_per_wave}
    if stage == "refine":  # opt-in: nothing when refine.enabled is false
        _, trained = _trained_entries(run.refine_library / RunDir.LIBRARY_INDEX)
        return {"tokens": sum(e["metrics"]["tokens"] for e in trained), "trained_variants": len(trained),
                "param_tokens": _param_tokens(trained)}
    if stage == "score":
        scores = _json(run.scores_file) or {"layers": []}
        candidates = sum(len(layer["candidates"]) for layer in scores["layers"])
        seqs = min(cfg.score.num_sequences, _rows(run, "valid"))
        return {"tokens": seqs * cfg.data.seq_len * candidates, "candidates": candidates, "sequences": seqs}
    if stage == "uptrain":
        logs = [_json(p) for p in (run.training_log(c.name) for c in run.child_dirs()) if p.is_file()]
        tokens = sum(log["train"][-1]["tokens"] for log in logs if log and log["train"])
        return {"tokens": tokens, "steps": sum(log["steps"] for log in logs if log), "children": len(logs)}
    if stage == "eval":
        ev = _json(run.eval_file) or {}
        models = len(ev.get("models", [])) if isinstance(ev.get("models"), list) else len(ev.get("models", {}))
        seqs = min(cfg.eval.max_sequences or 0, _rows(run, "test"))
        return {"tokens": seqs * cfg.data.seq_len * models, "models": models, "sequences": seqs}
    return {}


def _rows(run: RunDir, split: str) -> int:
    from puzzle.stages.data import load_tokens

    return int(load_tokens(run.data, split).shape[0])


def peaks() -> dict[str, float]:
    """CUDA peaks since the last reset, GiB (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def measure_stage(cfg: Any, stage: str) -> dict[str, Any]:
    """Run one stage; its wall time and CUDA peaks (allocated and reserved, reset before it)."""
    free_gpu()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_pipeline(cfg, start=stage, until=stage)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"stage": stage, "wall_s": round(wall, 2), **peaks()}
    work = stage_work(stage, RunDir(cfg.run_dir), cfg)
    row.update(work)
    add_rates(row, wall)
    return row


def free_disk(stage: str, run: RunDir, parent_src: Path) -> None:
    if stage == "import":  # the native copy in RUN/parent is what every later stage reads
        for f in parent_src.glob("*.safetensors"):
            f.unlink()
    if stage == "realize":  # uptrain, eval and report read the children and the library's JSON only
        for f in [*run.library.rglob("*.safetensors"), *run.refine_library.rglob("*.safetensors")]:
            f.unlink()


def child_params(run: RunDir) -> int | None:
    """Parameters of the (first) realized child."""
    from puzzle.formats import load_model_config

    for child in run.child_dirs():
        if (child / SIDECAR).is_file():
            return load_model_config(child).param_count()
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON results path")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--work", type=Path, default=Path("runs/pipeline_8b"), help="parent, tokenizer and run dir")
    p.add_argument("--data", nargs="+", default=SHARED_TEXT, help="text sources (files or folders)")
    p.add_argument("--space", choices=["small", "full"], default="small", help="BLD search space (see above)")
    p.add_argument("--seq-len", type=int, default=0, help="0 = 1024 (8b) / 32 (tiny)")
    p.add_argument("--tokens-per-variant", type=int, default=0, help="0 = 32768 (8b) / 2048 (tiny)")
    p.add_argument("--max-params-per-wave", type=int, default=None, help="default: what fits the GPU")
    p.add_argument("--score-sequences", type=int, default=2)
    p.add_argument("--max-child-params", default="5.5B", help="params constraint: keeps GKD within one GPU")
    p.add_argument("--uptrain-steps", type=int, default=20)
    p.add_argument("--eval-sequences", type=int, default=4)
    p.add_argument("--eval-throughput", action="store_true", help="also time each model on batch1 (compiles)")
    p.add_argument("--free-disk", action=argparse.BooleanOptionalAction, default=None, help="default: on for 8b")
    p.add_argument("--from", dest="start", choices=STAGES)
    p.add_argument("--until", choices=STAGES)
    args = p.parse_args()
    free = args.free_disk if args.free_disk is not None else args.shape != "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() and args.shape != "tiny" else "cpu")
    missing = [s for s in args.data if not Path(s).exists()]
    if missing:
        p.error(f"data sources {missing} do not exist; pass --data with text files or folders")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    try:
        tok_dir = train_bpe(list(args.data), work / "tokenizer", TOKENIZER_VOCAB[args.shape])
    except PuzzleError as e:  # a source with no readable files
        p.error(str(e))
    tokenizer_s = time.perf_counter() - t0
    parent_src = work / "parent-hf"  # the HF model the import stage reads
    parent = make_parent(args.shape, parent_src, tok_dir, device)
    print(f"parent: {parent['params'] / 1e9:.2f}B params, init {parent['init_s']} s, save {parent['save_s']} s",
          file=sys.stderr, flush=True)
    run = RunDir(work / "run")
    cfg = load_run_config(run_config(args, run.root, parent_src, parent["params"]))
    previous = _json(args.out) if args.out.is_file() else None
    rows = {r["stage"]: r for r in (previous or {}).get("stages", [])} if previous else {}
    common = {"meta": metadata(), "benchmark": "pipeline_8b", "shape": args.shape, "device": str(device),
              "gpu_total_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
              if device.type == "cuda" else None, "parent": parent, "tokenizer_s": round(tokenizer_s, 2)}
    failed = False
    signal.signal(signal.SIGTERM, _stopped)  # `timeout` sends SIGTERM: record the time spent, then stop
    for stage in select_stages(args.start, args.until):
        earlier = rows.get(stage, {}).get("interrupted_after_s", 0.0)  # a previous call's part of this stage
        t0 = time.perf_counter()
        try:
            rows[stage] = measure_stage(cfg, stage)
        except (PuzzleError, RuntimeError) as e:  # an OOM included: keep what was measured, say where it broke
            rows[stage] = {"stage": stage, "error": f"{type(e).__name__}: {e}"[:2000], **peaks()}
            failed = True
        except Stopped:  # the stage resumes where it stopped in the next call; its time so far is kept
            rows[stage] = {"stage": stage, "interrupted_after_s": round(earlier + time.perf_counter() - t0, 2)}
            write_result(args.out, common, rows, cfg, t_start)
            print(f"stopped during {stage}; rerun with --from {stage} to finish it", file=sys.stderr)
            return 1
        if earlier:  # a stage split over calls: its wall time is both parts, each recorded
            rows[stage]["calls_wall_s"] = [earlier, rows[stage]["wall_s"]]
            rows[stage]["wall_s"] = round(earlier + rows[stage]["wall_s"], 2)
            add_rates(rows[stage], rows[stage]["wall_s"])
        print(json.dumps(rows[stage]), file=sys.stderr, flush=True)
        # Written after every stage: a run stopped by a time limit keeps the stages it finished.
        result = write_result(args.out, common, rows, cfg, t_start)
        if failed:
            break
        if free:
            free_disk(stage, run, parent_src)
    print(stage_table(result))
    return 1 if failed else 0


class Stopped(BaseException):  # not Exception: no broad handler inside a stage may swallow it
    """SIGTERM arrived (a time limit): the current stage is cut short."""


def _stopped(signum: int, frame: Any) -> None:
    raise Stopped


def write_result(out: Path, common: dict[str, Any], rows: dict[str, dict[str, Any]], cfg: Any,
                 t_start: float) -> dict[str, Any]:
    stages = [rows[s] for s in STAGES if s in rows]
    result: dict[str, Any] = {
        **common, "child_params": child_params(RunDir(cfg.run_dir)),
        "config": _json(RunDir(cfg.run_dir).config),
        "stages": stages, "stages_wall_s": round(sum(r.get("wall_s", 0.0) for r in stages), 2),
        "script_wall_s": round(time.perf_counter() - t_start, 2),
    }
    result["projection_70b_8gpu"] = project_70b(result)
    write_json(out, result)
    return result


if __name__ == "__main__":
    sys.exit(main())
