"""lm-evaluation-harness in-process: our model object handed to lm-eval's `HFLM`, no export, no network.

`HFView` makes a `PuzzleModel` look like a transformers causal LM as far as `HFLM` looks (`config`, `device`,
`tie_weights`, `forward(input_ids).logits`, greedy `generate`), so any task lm-eval can read offline runs on
the very weights `puzzle eval` scores: a local task YAML (`dataset_path: json` with `data_files`, found through
`include_path`) or a task whose dataset is already in the Hugging Face cache. The tokenizer is the model
directory's, loaded with transformers as lm-eval would. lm-eval is optional (`pip install puzzle-llm[lm-eval]`)
and imported only when tasks are configured.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.evaluate.tasks import choose_metric

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)  # lm-eval task or group names; empty: lm-eval is not run
    include_path: str | None = None  # a directory of task YAMLs (e.g. dataset_path: json + data_files)
    num_fewshot: int | None = None  # default: each task's own
    limit: int | None = None  # first N documents per task
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PuzzleError(f"eval.lm_eval.{name} must be positive, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise PuzzleError(f"eval.lm_eval.num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise PuzzleError(f"eval.lm_eval.include_path {self.include_path} is not a directory of task YAMLs")


class HFView(torch.nn.Module):
    """A PuzzleModel as lm-eval's HFLM sees a pre-loaded transformers causal LM."""

    def __init__(self, model: PuzzleModel, name: str = "puzzle") -> None:
        super().__init__()
        self.inner = model
        self.name_or_path = name
        # What HFLM reads from a config: the model type (decoder-only), the context length, the vocabulary.
        self.config = SimpleNamespace(model_type="puzzle", max_position_embeddings=model.config.max_position_embeddings,
                                      vocab_size=model.config.vocab_size, is_encoder_decoder=False)

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """Nothing to tie: the model's own head is already what it is."""

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        # input_ids [B, T] right-padded by HFLM for log-likelihoods; causal: pads after a row change nothing.
        # fp32 logits: lm-eval's log-softmax then matches `puzzle eval`'s own scorer under bf16 weights.
        return SimpleNamespace(logits=self.inner(input_ids).logits.float())  # [B, T, V]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_length: int, stopping_criteria: Any = None,
                 attention_mask: torch.Tensor | None = None, do_sample: bool = False, **_: Any) -> torch.Tensor:
        """Greedy decoding [B, T] -> [B, T + new]. Rows arrive left-padded and the model takes no mask, so each row
        runs alone, each step over its whole prefix: slow, but exact, and only generation tasks need it."""
        if do_sample:
            raise PuzzleError("lm-eval asked for sampling; `puzzle eval` generates greedily only (do_sample: false)")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        rows = [input_ids[b][mask[b]] for b in range(input_ids.shape[0])]  # each [t_b], padding dropped
        out = input_ids
        while out.shape[1] < max_length:
            step = torch.stack([self.inner(r[None]).logits[0, -1].argmax() for r in rows]).to(out.dtype)  # [B]
            rows = [torch.cat([r, t[None]]) for r, t in zip(rows, step, strict=True)]
            out = torch.cat([out, step[:, None]], dim=1)
            # lm-eval's criteria see the padded batch, as from transformers' generate: stop when all rows stopped
            if stopping_criteria is not None and bool(torch.as_tensor(stopping_criteria(out, None)).all()):
                break
        return out


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network while lm-eval runs: the offline switches of datasets, the hub and transformers, set in the
    environment (read at import) and in the modules' constants when they are already imported."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    patched: list[tuple[Any, str, Any]] = []
    for module, names in (("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        mod = sys.modules.get(module)  # not imported yet: it reads the environment when it is
        for name in names:
            if mod is not None and hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hf_tokenizer(model_dir: Path) -> Any:
    """The model directory's tokenizer through transformers, as lm-eval loads one."""
    from transformers import AutoTokenizer  # local: only lm-eval runs need the transformers tokenizer

    try:
        with offline():
            return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise PuzzleError(f"lm-eval needs a Hugging Face tokenizer in {model_dir} (tokenizer.json or "
                          f"tokenizer_config.json), which transformers cannot load: {str(e).splitlines()[0]}") from None


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}}, the filter suffix dropped (`acc,none` -> `acc`), plus `n`."""
    out: dict[str, dict[str, float]] = {}
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr"):
                row[name if filt in ("", "none") or name not in row else f"{name},{filt}"] = float(value)
        if task in samples:
            row["n"] = samples[task].get("effective", samples[task].get("original", 0))
        out[task] = row
    return out


def as_task_metrics(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """The tasks with an accuracy (acc, else exact_match), named `lm-eval:TASK`, in `puzzle eval`'s task form:
    `metric` and `score` chosen as for a task of its own with metric "auto" (acc_norm where lm-eval gave it)."""
    out: dict[str, dict[str, Any]] = {}
    for task, row in summary.items():
        acc = row.get("acc", row.get("exact_match"))
        if acc is not None:
            res: dict[str, Any] = {"accuracy": acc, **({"acc_norm": row["acc_norm"]} if "acc_norm" in row else {}),
                                   "n": row.get("n", 0)}
            res["metric"] = choose_metric("auto", res, f"lm-eval:{task}")
            res["score"] = res[res["metric"]]
            out[f"lm-eval:{task}"] = res
    return out


@functools.lru_cache(maxsize=4)  # one index for every model of an eval
def task_manager(task_manager_cls: Any, include_path: str | None, tasks: tuple[str, ...]) -> Any:
    """lm-eval's task index: the include_path alone when it holds every task (indexing lm-eval's ~15k built-in
    task YAMLs takes tens of seconds), else the built-ins too."""
    if include_path is not None:
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return task_manager_cls(include_path=include_path)


def _import_lm_eval() -> Any:
    try:
        # local: lm-eval is an optional extra and a heavy import (datasets, pandas, sklearn)
        with offline():
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
    except ImportError:
        raise PuzzleError("eval.lm_eval.tasks needs lm-evaluation-harness: pip install 'puzzle-llm[lm-eval]' "
                          "(or pip install lm-eval)") from None
    return SimpleNamespace(simple_evaluate=lm_eval.simple_evaluate, HFLM=HFLM, TaskManager=TaskManager)


def _checked_manager(cfg: LmEvalConfig) -> Any:
    with offline():
        manager = task_manager(_import_lm_eval().TaskManager, cfg.include_path, tuple(cfg.tasks))
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise PuzzleError(f"lm-eval knows no task {unknown[0]!r}; give a task YAML directory as "
                          "eval.lm_eval.include_path (--lm-eval-include) or fix eval.lm_eval.tasks")
    return manager


def prepare_lm_eval(cfg: LmEvalConfig, model_dir: Path) -> Any:
    """Before any model runs: lm-eval is installed, knows every task; -> the tokenizer the tasks run with."""
    _checked_manager(cfg)
    return hf_tokenizer(model_dir)


def run_lm_eval(model: PuzzleModel, tokenizer: Any, cfg: LmEvalConfig, name: str = "puzzle") -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `model` for `cfg.tasks`, offline; -> summarize()'s {task: {metric: value}}."""
    lm_eval = _import_lm_eval()
    manager = _checked_manager(cfg)
    with offline():
        lm = lm_eval.HFLM(pretrained=HFView(model, name), tokenizer=tokenizer, batch_size=cfg.batch_size,
                          max_length=model.config.max_position_embeddings)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                              limit=cfg.limit, task_manager=manager, log_samples=False,
                                              bootstrap_iters=0)
        except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
            raise PuzzleError(f"lm-eval could not read tasks {cfg.tasks} offline ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); use a local task YAML "
                              "(dataset_path: json, dataset_kwargs.data_files) or data already in the HF cache") from None
    return summarize(results or {})
