"""Quality and throughput of the parent and its children, side by side -> `eval/eval.json`.

Per model: held-out LM loss and perplexity, KL(parent || model) and top-1 agreement with the parent on the
test split, which nothing before eval reads (BLD, scoring and uptraining use train and valid);
multiple-choice / last-word task accuracy (`puzzle.stages.evaluate.tasks`) and accuracy retained as a percentage of the
parent's; measured generation throughput from the runtime when a GPU is present.
Models are loaded one at a time next to the parent, so memory holds at most two.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from puzzle.core.artifacts import (
    fingerprint_files,
    hash_json,
    mark_stage_done,
    read_json,
    stage_is_current,
    write_json,
)
from puzzle.core.config import check_device, to_dict
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import warn
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import Workload, resolve_workloads, run_workloads
from puzzle.formats import load_model
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.data import load_tokens
from puzzle.stages.evaluate import long_context_eval
from puzzle.stages.evaluate.lm_harness import LmEvalConfig, as_task_metrics, prepare_lm_eval, run_lm_eval
from puzzle.stages.evaluate.long_context import LongContextConfig, LongContextItem
from puzzle.stages.evaluate.tasks import (
    LastWordItem,
    MultipleChoiceItem,
    TaskSpec,
    evaluate_task,
    load_task,
    primary_metric,
    task_names,
)
from puzzle.stages.report.summary import task_score
from puzzle.stages.uptrain.gkd import loss_terms

Items = list[MultipleChoiceItem] | list[LastWordItem]
HELDOUT_SPLIT = "test"  # the data split loss / perplexity / KL / agreement are measured on
GRAPH_MODES = ("auto", "fused", "manual", "none")  # the runtime's decode modes (runtime.engine.GRAPH_MODES)


@dataclass
class EvalConfig:
    children: list[str] = field(default_factory=list)  # names under children/; empty = every child
    uptrained: bool = True  # also evaluate children/<name>/uptrained where present
    batch_size: int = 8  # test-split sequences per forward
    task_batch_tokens: int = 16384  # task requests per forward: as many as fit this many padded tokens
    max_sequences: int | None = 256  # test-split sequences for loss / KL / agreement; None = all
    tasks: list[TaskSpec] = field(default_factory=list)
    task_limit: int | None = None  # cap on items per task unless the task sets its own limit
    throughput: bool = True  # measured with the runtime; GPU only
    workloads: list[str] = field(default_factory=lambda: ["batch1"])  # names: the run's workloads, then built-ins
    graphs: str = "auto"  # the runtime's decode mode; keep it equal to costs.graphs so predictions compare
    device: str | None = None  # default: cuda when present
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    parent: str = "parent"
    long_context: LongContextConfig | None = None  # RULER-like probes per context length; None = off, {} = defaults
    lm_eval: LmEvalConfig | None = None  # lm-evaluation-harness tasks on the same model objects; None = off

    def __post_init__(self) -> None:
        for name in ("batch_size", "task_batch_tokens"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"eval.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_sequences", "task_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PuzzleError(f"eval.{name} must be positive (or unset), got {value}")
        if self.graphs not in GRAPH_MODES:
            raise PuzzleError(f"eval.graphs {self.graphs!r} is not one of {list(GRAPH_MODES)}")
        check_device("eval.device", self.device)


@torch.no_grad()
def heldout_metrics(model: PuzzleModel, parent: PuzzleModel, tokens: np.ndarray, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    """LM loss, perplexity, KL(parent || model) and top-1 agreement over `tokens` [N, T]."""
    if len(tokens) == 0:
        raise PuzzleError("the test split holds no sequences; add text, lower data.seq_len or raise data.test_fraction")
    kl = lm = agree = 0.0
    n_tok = n_lm = 0
    for s in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(np.asarray(tokens[s:s + batch_size], dtype=np.int64)).to(device)  # [B, T]
        logits = model(ids).logits  # [B, T, V]
        t = loss_terms(logits, logits if model is parent else parent(ids).logits, None, None, ids)
        kl, lm, agree = kl + float(t.kl), lm + float(t.lm), agree + float(t.agree)
        n_tok, n_lm = n_tok + t.tokens, n_lm + t.lm_tokens
    loss = lm / max(n_lm, 1)
    return {"lm_loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "kl_to_parent": kl / n_tok,
            "agreement": agree / n_tok, "tokens": n_tok}


def task_metrics(model: PuzzleModel, tasks: dict[str, Items], tokenizer: Any, batch_tokens: int,
                 device: torch.device, encode: Callable[[str], list[int]] | None = None,
                 specs: dict[str, TaskSpec] | None = None) -> dict[str, dict[str, Any]]:
    """`encode`: the tokenizer's, possibly cached across models (every model sees the same requests). Each result
    names its primary `metric` (the task's spec, default acc_norm for multiple choice) and its value as `score`."""
    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids).logits

    max_len = model.config.max_position_embeddings
    out: dict[str, dict[str, Any]] = {}
    for name, items in tasks.items():
        res: dict[str, Any] = evaluate_task(items, logits_fn, encode or tokenizer.encode, tokenizer.bos_id, device, 1,
                                            max_len, max_tokens=batch_tokens)
        res["metric"] = primary_metric((specs or {}).get(name, TaskSpec(name)), res)
        res["score"] = res[res["metric"]]
        out[name] = res
    return out


def add_retention(results: dict[str, dict[str, Any]], reference: str = "parent") -> None:
    """Each model's task accuracy as a percentage of the reference's, and their mean (the paper's metric)."""
    ref = results[reference].get("tasks", {})
    for res in results.values():
        retained = {name: 100.0 * task_score(m) / task_score(ref[name])
                    for name, m in res.get("tasks", {}).items() if name in ref and task_score(ref[name])}
        res["retention_pct"] = retained
        res["mean_retention_pct"] = float(np.mean(list(retained.values()))) if retained else None
        ref_tp, tp = results[reference].get("throughput", {}), res.get("throughput", {})
        res["speedup"] = {w: tp[w]["output_tokens_per_s"] / ref_tp[w]["output_tokens_per_s"]
                          for w in tp if "output_tokens_per_s" in tp[w] and "output_tokens_per_s" in ref_tp.get(w, {})}


def measure_throughput(model: PuzzleModel, workloads: list[Workload], graphs: str = "auto") -> dict[str, Any]:
    """Output tokens/s per workload with the runtime (static cache, CUDA graphs); skipped without a GPU."""
    if model.embed_tokens.weight.device.type != "cuda":
        return {"skipped": "no GPU: throughput is measured on CUDA only"}
    try:
        from puzzle.runtime.bench import run_workload  # local: the runtime is optional, and GPU only here
    except ImportError as e:
        return {"skipped": f"runtime unavailable ({e})"}
    out: dict[str, Any] = {}
    for w in workloads:
        if w.tensor_parallel > 1:  # timing it on one GPU would be silently wrong
            out[w.name] = {"error": f"tensor_parallel={w.tensor_parallel}: eval times a model on one GPU only; "
                                    "its predicted throughput comes from the TP costs"}
            continue
        try:
            out[w.name] = run_workload(model, w, graphs=graphs)  # records the mode it ran with
        except PuzzleError as e:  # e.g. the workload does not fit this model: record, do not abort the eval
            out[w.name] = {"error": str(e)}
    return out


@contextlib.contextmanager
def _timed(into: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    """Wall seconds of the block (after the device finishes) into into[key]."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    into[key] = round(time.perf_counter() - start, 3)


def evaluate_models(loaders: dict[str, Callable[[], PuzzleModel]], parent: PuzzleModel, heldout: np.ndarray | None,
                    tasks: dict[str, Items], tokenizer: Any, cfg: EvalConfig, device: torch.device,
                    workloads: list[Workload] | None = None,
                    long_items: dict[str, dict[int, list[LongContextItem]]] | None = None,
                    lm_tokenizer: Any = None) -> dict[str, Any]:
    """Every model (loaded lazily, one at a time) against `parent`; the first loader should be the parent.
    `lm_tokenizer`: the transformers tokenizer lm-eval tasks (cfg.lm_eval) run with."""
    results: dict[str, dict[str, Any]] = {}
    encode = functools.lru_cache(maxsize=None)(tokenizer.encode) if tasks else None  # tokenized once, not per model
    for name, load in tqdm(loaders.items(), desc="eval: models", unit="model", total=len(loaders)):
        model = load()
        model.eval()
        res: dict[str, Any] = {"params": model.config.param_count(),
                               "kv_bytes_per_token": model.config.kv_cache_bytes_per_token(),
                               "blocks": [b.name for b in model.config.blocks]}
        seconds: dict[str, float] = {}
        if heldout is not None:  # None: no data split, tasks only
            with _timed(seconds, "heldout", device):
                res.update(heldout_metrics(model, parent, heldout, cfg.batch_size, device))
        if tasks:
            with _timed(seconds, "tasks", device):
                res["tasks"] = task_metrics(model, tasks, tokenizer, cfg.task_batch_tokens, device, encode,
                                            dict(zip(task_names(cfg.tasks), cfg.tasks, strict=True)))
        if cfg.lm_eval is not None and cfg.lm_eval.tasks:
            with _timed(seconds, "lm_eval", device):
                res["lm_eval"] = run_lm_eval(model, lm_tokenizer, cfg.lm_eval, name)
            res["tasks"] = {**res.get("tasks", {}), **as_task_metrics(res["lm_eval"])}  # table and retention
        if long_items and cfg.long_context is not None:
            res["long_context"] = long_context_eval.evaluate_long_context(
                long_items, long_context_eval.model_tail_logits(model), device, cfg.long_context.max_batch_tokens)
        if cfg.throughput:
            with _timed(seconds, "throughput", device):
                res["throughput"] = measure_throughput(model, workloads or resolve_workloads(cfg.workloads),
                                                       cfg.graphs)
        res["eval_seconds"] = seconds
        results[name] = res
        if model is not parent:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_retention(results, reference=next(iter(loaders)))
    long_context_eval.add_long_context_retention(results, reference=next(iter(loaders)))
    return results


def load_tasks(cfg: EvalConfig) -> dict[str, Items]:
    tasks: dict[str, Items] = {}
    for name, spec in zip(task_names(cfg.tasks), cfg.tasks, strict=True):  # distinct: none overwrites another
        if spec.limit is None and cfg.task_limit is not None:
            spec = replace(spec, limit=cfg.task_limit)  # keeps labels, separator
        tasks[name] = load_task(spec)
    return tasks


def discover_children(run_dir: Path | RunDir, cfg: EvalConfig) -> dict[str, Path]:
    """name -> model dir for the realized children (and their uptrained versions)."""
    run = RunDir(run_dir)
    names = list(cfg.children) or [p.name for p in run.child_dirs()]
    found: dict[str, Path] = {}
    for name in names:
        path = run.child(name)
        if not RunDir.model_config(path).exists():
            raise PuzzleError(f"child {name!r} not found in {run.children}; run `puzzle realize` or fix eval.children")
        found[name] = path
        if cfg.uptrained and RunDir.model_config(run.uptrained(name)).exists():
            found[f"{name}/uptrained"] = run.uptrained(name)
    return found


def _model_dtype(cfg: EvalConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _inputs_hash(run: RunDir, models: dict[str, Path], cfg: EvalConfig) -> str:
    paths = [run.root / cfg.parent, run.data, *models.values(), *(Path(t.path) for t in cfg.tasks),
             *(Path(t.labels) for t in cfg.tasks if t.labels),
             *([Path(cfg.lm_eval.include_path)] if cfg.lm_eval and cfg.lm_eval.include_path else [])]
    # Paths inside the run directory enter relative to it, so a moved or renamed run stays current.
    def name(p: Path) -> str:
        return str(p.relative_to(run.root)) if p.is_relative_to(run.root) else str(p)
    return hash_json({"inputs": [[name(p), fingerprint_files(p)] for p in paths], "config": to_dict(cfg)})


def run_eval(run_dir: Path | RunDir, cfg: EvalConfig, workloads: list[Workload] | None = None) -> dict[str, Any]:
    """Evaluate parent and children; writes and returns `eval/eval.json`.

    `workloads`: the run's workloads (its config's top-level list), which `cfg.workloads` names; default: those
    of the config the run saved, else the built-in ones.
    """
    run = RunDir(run_dir)
    # Resolved before anything runs: an unknown name is a one-line error naming the known ones.
    throughput_workloads = resolve_workloads(cfg.workloads, run_workloads(run.root) if workloads is None else workloads)
    out_dir = run.eval
    children = discover_children(run, cfg)
    inputs_hash = _inputs_hash(run, children, cfg)
    if stage_is_current(out_dir, inputs_hash) and run.eval_file.exists():
        return read_json(run.eval_file)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _model_dtype(cfg, device)
    tasks = load_tasks(cfg)
    lm_tasks = cfg.lm_eval is not None and bool(cfg.lm_eval.tasks)
    # checked before any model runs: lm-eval installed, every task known; its tokenizer
    lm_tokenizer = prepare_lm_eval(cfg.lm_eval, run.root / cfg.parent) if cfg.lm_eval and lm_tasks else None
    tokenizer = None
    if tasks or cfg.long_context is not None:
        tokenizer = load_tokenizer(run.root / cfg.parent)
    # The test split: documents that neither chose the blocks (scoring) nor trained them (BLD, uptraining).
    heldout, skipped = None, None
    if run.data_manifest.exists() or not (tasks or lm_tasks or cfg.long_context):  # nothing else: the data error
        heldout = load_tokens(run.data, HELDOUT_SPLIT)
        if cfg.max_sequences is not None:
            heldout = heldout[:cfg.max_sequences]
    else:
        skipped = f"{run.data} holds no data split (`puzzle data` not run); only tasks are scored"
        warn(run.root, "eval", f"held-out loss, perplexity, KL and agreement skipped: {skipped}")
    parent = load_model(run.root / cfg.parent, device=device, dtype=dtype)
    loaders: dict[str, Callable[[], PuzzleModel]] = {"parent": lambda: parent}
    for name, path in children.items():
        loaders[name] = lambda path=path: load_model(path, device=device, dtype=dtype)
    long_items = None
    if cfg.long_context is not None:  # haystack: the run's own text; lengths up to the parent's context
        haystack = load_tokens(run.data, cfg.long_context.haystack_split("eval"))
        long_items = long_context_eval.prepare_items(cfg.long_context, haystack, tokenizer,
                                                     parent.config.max_position_embeddings)
    models = evaluate_models(loaders, parent, heldout, tasks, tokenizer, cfg, device, throughput_workloads,
                             long_items, lm_tokenizer)
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "reference": "parent",
              "split": HELDOUT_SPLIT, "sequences": 0 if heldout is None else int(heldout.shape[0]),
              "seq_len": None if heldout is None else int(heldout.shape[1]), "heldout_skipped": skipped,
              "tasks": {name: len(items) for name, items in tasks.items()}, "models": models,
              "config": to_dict(cfg)}
    if long_items:
        result["long_context"] = long_context_eval.summary(cfg.long_context, long_items)
        plot = long_context_eval.plot_long_context(models, out_dir / "long_context.png")
        result["long_context"]["plot"] = plot.name if plot else None
    write_json(run.eval_file, result)
    mark_stage_done(out_dir, "eval", inputs_hash)
    print(f"eval: {len(models)} models on {result['sequences']} {HELDOUT_SPLIT} sequences"
          f"{f' and {len(tasks)} task(s)' if tasks else ''} -> {run.eval_file}")
    return result
