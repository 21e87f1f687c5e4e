"""Global knowledge distillation (GKD, "uptraining"): the whole child learns from the frozen parent.

Loss = cosine_weight * mean over layers of (1 - cos(child h_l, parent h_l)) at every layer output
     + kl_weight * KL(parent || child) on the logits
     + lm_weight * next-token cross-entropy (off by default: the paper's ablation found it hurts).
AdamW, linear warm-up then cosine decay, gradient accumulation, bf16 autocast on GPU. One code path for any
world size: under torchrun the child (and the frozen parent) are wrapped with DDP or FSDP2 from outside.
Checkpoints hold model, optimizer, scheduler, data position (the step) and every rank's RNG, and resume exactly.
The step itself is `step.train_step`; one process on CUDA replays it as one CUDA graph (`graphed`), and the
per-step metrics stay on the device until a flush (`metrics.MetricHistory`), so no step waits for the GPU.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from puzzle.core.artifacts import (
    atomic_dir,
    fingerprint_files,
    hash_json,
    mark_stage_done,
    stage_is_current,
    write_json,
)
from puzzle.core.config import check_device, to_dict
from puzzle.core.distributed import DistInfo, barrier, distributed, rank_resources, reset_peak_memory
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model
from puzzle.formats.export import export_model_dir
from puzzle.model.decoder import PuzzleModel, RotaryEmbedding
from puzzle.stages.data import load_tokens
from puzzle.stages.uptrain import parallel
from puzzle.stages.uptrain.graphed import GraphedStep, use_cuda_graphs
from puzzle.stages.uptrain.lr_schedule import warmup_cosine
from puzzle.stages.uptrain.metrics import MetricHistory, metrics_of
from puzzle.stages.uptrain.step import forward_terms, reduce_sums, sum_vector, train_step


@dataclass
class UptrainConfig:
    steps: int = 200  # optimizer steps (ignored when `tokens` is set)
    tokens: int | None = None  # token budget; steps = ceil(tokens / tokens per step)
    micro_batch_size: int = 4  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    cosine_weight: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    val_every: int = 50  # 0 = only before and after training
    val_batches: int = 8  # micro-batches per rank per validation
    checkpoint_every: int = 50  # 0 = no intermediate checkpoints
    keep_checkpoint: bool = False  # keep the last checkpoint after a successful export
    log_every: int = 50  # steps between host reads of the training metrics (also read before validation,
    #                      checkpoints and the end; the NaN check runs then): no host sync in between
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # the whole step as one CUDA graph; auto: one process on CUDA
    parallel: Literal["auto", "fsdp", "ddp", "none"] = "auto"
    fsdp_min_params: int = 1_000_000_000  # 'auto' shards with FSDP2 from this many child parameters
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str | None = None  # default: cuda when present
    seed: int = 0
    parent: str = "parent"  # the parent's directory, relative to the run directory

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"uptrain.{name} must be positive, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise PuzzleError(f"uptrain.tokens must be positive, got {self.tokens}; or leave it unset to use steps")
        if min(self.cosine_weight, self.kl_weight, self.lm_weight) < 0 or \
                self.cosine_weight + self.kl_weight + self.lm_weight == 0:
            raise PuzzleError("uptrain loss weights must be >= 0 and not all zero (e.g. kl_weight=1)")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise PuzzleError(f"uptrain.lr must be positive and weight_decay, grad_clip >= 0 (got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise PuzzleError(f"uptrain.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "val_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise PuzzleError(f"uptrain.{name} must be >= 0, got {getattr(self, name)}")
        if self.val_batches <= 0:
            raise PuzzleError(f"uptrain.val_batches must be positive, got {self.val_batches}")
        if self.fsdp_min_params < 0:
            raise PuzzleError(f"uptrain.fsdp_min_params must be >= 0, got {self.fsdp_min_params}")
        check_device("uptrain.device", self.device)


@dataclass
class GKDResult:
    log: dict[str, Any]  # {"train": [...per step...], "valid": [...], "steps": N, ...}
    model: nn.Module  # the trained child (sharded under FSDP)
    mode: str = "none"
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # cuda_graphs: whether steps replayed a CUDA graph


# ---- data ------------------------------------------------------------------------------------------------


def check_inputs(child: PuzzleModel, parent: PuzzleModel, train: np.ndarray, valid: np.ndarray | None) -> None:
    c, p = child.config, parent.config
    if c.vocab_size != p.vocab_size:
        raise PuzzleError(
            f"the child's vocabulary ({c.vocab_size} tokens) differs from the parent's ({p.vocab_size}); "
            "uptrain a child realized from this run's parent"
        )
    if c.num_layers != p.num_layers or c.hidden_size != p.hidden_size:
        raise PuzzleError(
            f"the child ({c.num_layers} layers, hidden {c.hidden_size}) does not match the parent "
            f"({p.num_layers} layers, hidden {p.hidden_size}); GKD needs the same depth and width"
        )
    for split, arr in (("train", train), ("valid", valid)):
        if arr is None:
            continue
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
            raise PuzzleError(
                f"the {split} corpus is shorter than one sequence (token array shape {tuple(arr.shape)}); "
                "add text to the corpus or lower data.seq_len and rerun `puzzle data`"
            )
        if int(arr.max()) >= p.vocab_size or int(arr.min()) < 0:
            raise PuzzleError(f"the {split} tokens fall outside the parent's vocabulary; rerun `puzzle data`")


def batch_indices(num_seqs: int, seed: int, micro_index: int, rank: int, world: int, micro: int) -> np.ndarray:
    """Sequence indices of one rank's micro-batch number `micro_index` (a pure function: resume = step).

    The stream is an endless concatenation of seeded per-epoch permutations; each global micro-batch takes the
    next world*micro entries and rank r takes its own slice, so ranks see distinct shards and a run's data
    depends on the global batch only, not on how it is split across ranks.
    """
    start = (micro_index * world + rank) * micro
    positions = np.arange(start, start + micro)
    epochs, offsets = positions // num_seqs, positions % num_seqs
    out = np.empty(micro, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_seqs)
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out


def _ids(tokens: np.ndarray, idx: np.ndarray | list[int], device: torch.device) -> torch.Tensor:
    """Rows of a (possibly read-only uint16 memmap) token array as int64 ids [len(idx), T]."""
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64)).to(device)


def total_steps(cfg: UptrainConfig, seq_len: int, world: int) -> int:
    if cfg.tokens is None:
        return cfg.steps
    return max(1, math.ceil(cfg.tokens / (cfg.micro_batch_size * cfg.grad_accum * world * seq_len)))


def lr_lambda(cfg: UptrainConfig, steps: int) -> Callable[[int], float]:
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))
    return lambda s: warmup_cosine(s, steps, warmup, cfg.min_lr_ratio)


def host_batch(train: np.ndarray, cfg: UptrainConfig, step: int, info: DistInfo) -> torch.Tensor:
    """This rank's micro-batches of optimizer step `step` as int64 ids on the host [grad_accum, micro, T]."""
    rows = [batch_indices(len(train), cfg.seed, step * cfg.grad_accum + m, info.rank, info.world_size,
                          cfg.micro_batch_size) for m in range(cfg.grad_accum)]
    return torch.from_numpy(np.stack([np.asarray(train[idx], dtype=np.int64) for idx in rows]))


@torch.no_grad()
def validate(child: nn.Module, parent: nn.Module, valid: np.ndarray, cfg: UptrainConfig, info: DistInfo,
             autocast: bool) -> dict[str, float]:
    """Loss terms, KL and top-1 agreement on the first validation sequences, split across ranks."""
    was_training = child.training
    child.eval()
    n = min(len(valid), cfg.val_batches * cfg.micro_batch_size * info.world_size)
    per_rank = math.ceil(n / info.world_size)  # every rank runs the same number of forwards (FSDP needs it)
    idx = [(info.rank + info.world_size * i) % len(valid) for i in range(per_rank)]
    sums = torch.zeros(6, device=info.device)
    for s in range(0, per_rank, cfg.micro_batch_size):
        ids = _ids(valid, idx[s:s + cfg.micro_batch_size], info.device)
        sums += sum_vector(forward_terms(child, parent, ids, autocast, with_hidden=True), info.device)
    child.train(was_training)
    return metrics_of(reduce_sums(sums).tolist(), cfg)


# ---- the loop ---------------------------------------------------------------------------------------------


def train_gkd(child: PuzzleModel, parent: PuzzleModel, train: np.ndarray, valid: np.ndarray, cfg: UptrainConfig,
              work_dir: Path, info: DistInfo, fingerprint: str = "",
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              run_dir: Path | None = None) -> GKDResult:
    """Distil `parent` into `child` in place; checkpoints under `work_dir` and resumes from them.

    `on_step(step, record)` sees every step's log record, in order, once its metrics are read on the host
    (every `log_every` steps, after that step's validation and checkpoint). `run_dir` keeps warnings.
    """
    # Function-level: torch.distributed.checkpoint and DTensor cost ~1.5 s to import, which every CLI
    # command (and the config check before a run) would otherwise pay.
    from puzzle.stages.uptrain.checkpoint import load_checkpoint, save_checkpoint

    check_inputs(child, parent, train, valid)
    steps = total_steps(cfg, train.shape[1], info.world_size)
    device = info.device
    started = time.perf_counter()
    reset_peak_memory(device)
    autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    child.float().requires_grad_(True).train()
    parent.requires_grad_(False).eval()
    if autocast and device.type == "cuda":
        parent.to(torch.bfloat16)  # frozen teacher: half the memory, same numerics as autocast
    mode = parallel.choose_mode(cfg.parallel, info, sum(p.numel() for p in child.parameters()), cfg.fsdp_min_params)
    wrapped = parallel.shard_model(child, mode, device, trainable=True)
    teacher = parallel.shard_model(parent, mode, device, trainable=False)
    graphs = _cuda_graphs(cfg, mode, info)
    # Fused on CUDA: no full-size temporaries in the step (foreach's sqrt(v) is 4 bytes/param: 20 GB at 5B).
    # Capturable for CUDA graphs: the step count stays on the device (the fused kernel keeps it there anyway).
    optimizer = torch.optim.AdamW(child.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  fused=True if device.type == "cuda" else None, capturable=graphs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    fingerprint = hash_json([fingerprint, _trajectory_config(cfg), info.world_size, steps])
    ckpt_path = Path(work_dir) / "checkpoint"
    log: dict[str, Any] = {"train": [], "valid": [], "steps": steps, "mode": mode, "world_size": info.world_size}
    start = 0
    restored = load_checkpoint(ckpt_path, child, optimizer, scheduler, fingerprint, mode, info)
    if restored is not None:
        start, log = restored
        if info.is_main:
            print(f"uptrain {Path(work_dir).parent.name}: resuming from step {start} of {steps}")
    elif valid is not None:
        log["valid"].append({"step": 0, **validate(wrapped, teacher, valid, cfg, info, autocast)})
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * info.world_size * train.shape[1]
    name = Path(work_dir).parent.name  # the child: work_dir is children/<name>/.uptrain
    bar = tqdm(total=steps, initial=start, desc=f"uptrain {name}", unit="step", disable=not info.is_main,
               mininterval=1.0)
    history = MetricHistory(cfg.log_every, device)
    graphed = GraphedStep(child, teacher, optimizer, cfg, (cfg.grad_accum, cfg.micro_batch_size, train.shape[1]),
                          device, autocast, run_dir) if graphs else None
    for step in range(start, steps):
        lrs = scheduler.get_last_lr()
        batch = host_batch(train, cfg, step, info)  # [grad_accum, micro, T] on the host
        vector = graphed(batch, lrs) if graphed is not None else None  # [WIDTH] metrics, on the device
        if vector is None:  # eager (or the graph's capture failed just now)
            graphed = None
            optimizer.zero_grad(set_to_none=True)
            ids = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)
            vector = train_step(wrapped, child, teacher, optimizer, list(ids.unbind(0)), cfg, mode, autocast)
        scheduler.step()
        last = step + 1 == steps
        validating = valid is not None and (last or bool(cfg.val_every and (step + 1) % cfg.val_every == 0))
        checkpointing = bool(cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last)
        records = []
        if history.add(step + 1, vector, lrs[0]) or last or validating or checkpointing:
            records = history.flush(cfg, tokens_per_step)  # the NaN check: raises before any checkpoint below
            log["train"].extend(records)
            bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", kl=f"{records[-1]['kl']:.4f}", refresh=False)
        if validating:
            log["valid"].append({"step": step + 1, **validate(wrapped, teacher, valid, cfg, info, autocast)})
        if checkpointing:
            save_checkpoint(ckpt_path, child, optimizer, scheduler, step + 1, log, fingerprint, mode, info)
        bar.update(1)
        for record in records if on_step is not None else []:
            on_step(record["step"], record)
    bar.close()
    # Per-rank wall time and peak memory of this invocation (a resumed run counts only its own steps).
    ranks = rank_resources(info, time.perf_counter() - started, steps=steps - start)
    if info.is_main and log["train"]:
        valid_kl = f", valid KL {log['valid'][-1]['kl']:.4f}" if log["valid"] else ""
        print(f"uptrain {name}: {steps} steps, train loss {log['train'][-1]['loss']:.4f}{valid_kl}")
    return GKDResult(log=log, model=child, mode=mode, resumed_from=start,
                     extra={"cuda_graphs": graphed is not None and graphed.graph is not None, "ranks": ranks})


def _cuda_graphs(cfg: UptrainConfig, mode: str, info: DistInfo) -> bool:
    if cfg.cuda_graphs == "on" and not use_cuda_graphs("on", mode, info.device):
        raise PuzzleError(f"uptrain.cuda_graphs=on needs one process on a CUDA device (this run: world size "
                          f"{info.world_size} on {info.device.type}); set uptrain.cuda_graphs=auto or off")
    return use_cuda_graphs(cfg.cuda_graphs, mode, info.device)


def _trajectory_config(cfg: UptrainConfig) -> dict[str, Any]:
    """Config fields that change the training trajectory (checkpoint/validation/logging cadence and whether
    the step runs as a CUDA graph do not)."""
    d = to_dict(cfg)
    for key in ("checkpoint_every", "keep_checkpoint", "val_every", "val_batches", "device", "log_every",
                "cuda_graphs"):
        d.pop(key)
    return d


# ---- the stage --------------------------------------------------------------------------------------------


def unshard_to_plain(model: nn.Module, config: Any, dtype: torch.dtype) -> PuzzleModel | None:
    """Collective: the full trained weights as a plain CPU PuzzleModel on rank 0 (None elsewhere)."""
    state = parallel.full_model_state(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = PuzzleModel(config)
    plain.load_state_dict(state, assign=True)
    plain.rotary = RotaryEmbedding(config)  # built on meta above; its table must be real
    return plain.to(dtype)


def run_uptrain(run_dir: Path | RunDir, child_dir: Path, cfg: UptrainConfig) -> Path:
    """GKD of the child in `child_dir` against `run_dir/parent`; writes `child_dir/uptrained/` (HF dir + log)."""
    run, child_dir = RunDir(run_dir), Path(child_dir)
    out = RunDir.uptrained_of(child_dir)
    parent_dir = run.root / cfg.parent
    if not child_dir.is_dir():
        raise PuzzleError(f"child directory {child_dir} does not exist; run `puzzle realize` first")
    # Top-level files only: a 70B child is not re-hashed, and the child's own uptrained/ output is not an input.
    inputs = {"child": fingerprint_files(child_dir), "parent": fingerprint_files(parent_dir),
              "data": fingerprint_files(run.data), "config": _trajectory_config(cfg)}
    inputs_hash = hash_json(inputs)
    if stage_is_current(out, inputs_hash):
        print(f"uptrain {child_dir.name}: {out} is current, nothing to do")
        return out
    with distributed(cfg.device) as info:
        parent = load_model(parent_dir)
        child = load_model(child_dir)
        export_dtype = next(child.parameters()).dtype
        config = child.config
        train = load_tokens(run.data, "train")
        valid = load_tokens(run.data, "valid")
        work = child_dir / ".uptrain"
        result = train_gkd(child, parent, train, valid, cfg, work, info, fingerprint=inputs_hash, run_dir=run.root)
        plain = unshard_to_plain(result.model, config, export_dtype)
        if plain is not None:
            with atomic_dir(out) as tmp:
                sidecar = {"stage": "uptrain", "uptrain": to_dict(cfg), "steps": result.log["steps"],
                           "final_valid": result.log["valid"][-1] if result.log["valid"] else None}
                # The parent's native dir: loading a tokenizer from the child's remote-code dir can prompt for trust.
                export_model_dir(plain, tmp, tokenizer_source=parent_dir, extra_sidecar=sidecar)
                write_json(tmp / RunDir.TRAINING_LOG, {"config": to_dict(cfg), **result.log,
                                                       "ranks": result.extra["ranks"]})
                mark_stage_done(tmp, "uptrain", inputs_hash)
            if not cfg.keep_checkpoint:
                shutil.rmtree(work, ignore_errors=True)
            if info.is_main:
                print(f"uptrain {child_dir.name}: wrote {out}")
        barrier()
    return out
