"""The `library` stage: blockwise local distillation (BLD) of every candidate sub-block.

    run_library(run_dir, cfg)          reads parent/ and data/, writes library/
    build_library(library_dir, ...)    the same on an in-memory parent and token arrays (tests, benchmarks)
Under `torchrun --nproc-per-node N` the (layer, variant) items are split across ranks by cost; world size 1
is the same code path. Finished entries are never retrained; `library.json` and the stage stamp are written
only when every item is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from puzzle.core.artifacts import (
    STAMP,
    hash_file,
    hash_json,
    hash_paths,
    mark_stage_done,
    read_json,
    stage_is_current,
)
from puzzle.core.config import check_device, to_dict
from puzzle.core.distributed import (
    all_gather_objects,
    barrier,
    distributed,
    rank_resources,
    reset_peak_memory,
)
from puzzle.core.dtypes import DTYPE_BYTES, torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.data import load_tokens
from puzzle.stages.library.search_space import SearchSpaceConfig, layer_spaces
from puzzle.stages.library.store import Library, LibraryEntry, read_sidecar, write_entry, write_index
from puzzle.stages.library.summary import write_summary
from puzzle.stages.library.train import WarmStart, is_trained, train_wave
from puzzle.stages.library.worksplit import item_cost, split_items, waves

__all__ = ["Library", "LibraryConfig", "LibraryEntry", "SearchSpaceConfig", "build_library", "run_library"]



@dataclass
class LibraryConfig:
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    tokens_per_variant: int = 2_000_000  # training tokens each variant sees (the paper: ~1B at 70B scale)
    batch_size: int = 8  # sequences per step (sequence length comes from data/)
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1  # cosine decays to lr * this
    grad_clip: float = 1.0
    init_batches: int = 4  # calibration batches for channel selection and the ridge fits
    valid_batches: int = 4  # validation batches for nMSE before/after
    ridge: float = 1e-3  # relative ridge strength of the linear inits
    # fewer KV heads: "pca" fits them to the parent's heads and input covariance (stages/library/kv_init.py);
    # "mean" mean-pools the merged heads' K and V projections (the paper's init)
    kv_init: str = "pca"
    seed: int = 0
    device: str = "auto"  # auto = this rank's GPU if any, else cpu
    dtype: str = "auto"  # parent dtype: auto = bfloat16 on GPU, float32 on CPU; also the saved dtype
    autocast: bool = True  # bf16 autocast of the variants on GPU (weights and optimiser stay fp32)
    max_params_per_wave: int = 0  # memory bound: trainable parameters trained together (0 = all at once)
    max_items_per_wave: int = 0  # 1 = one variant at a time, the parent re-run for each (a baseline)
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("tokens_per_variant", "batch_size", "lr", "grad_clip", "valid_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"library.{name} must be positive, got {getattr(self, name)}")
        for name in ("init_batches", "max_params_per_wave", "max_items_per_wave", "weight_decay", "ridge"):
            if getattr(self, name) < 0:
                raise PuzzleError(f"library.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction < 1:
            raise PuzzleError(f"library.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise PuzzleError(f"library.min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if self.dtype not in ("auto", *DTYPE_BYTES):
            raise PuzzleError(f"library.dtype {self.dtype!r} is not one of auto, {', '.join(DTYPE_BYTES)}")
        if self.kv_init not in ("pca", "mean"):
            raise PuzzleError(f"library.kv_init {self.kv_init!r} is not one of pca, mean")
        check_device("library.device", self.device)


def _device(cfg: LibraryConfig) -> str | None:
    return None if cfg.device == "auto" else cfg.device


def all_items(spaces: list) -> list[LibraryEntry]:  # list[LayerSpace]
    items = []
    for s in spaces:
        items += [LibraryEntry(s.layer, "attention", a, None, None) for a in s.attention]
        items += [LibraryEntry(s.layer, "ffn", None, f, None) for f in s.ffn]
        items += [LibraryEntry(s.layer, "block", b.attention, b.ffn, None) for b in s.blocks]
    return items


ParentLoader = Callable[[torch.device, torch.dtype], PuzzleModel]


def build_library(library_dir: str | Path, parent: PuzzleModel | ParentLoader, train: np.ndarray,
                  valid: np.ndarray, cfg: LibraryConfig, inputs_hash: str = "",
                  items: list[LibraryEntry] | None = None,
                  warm_start: Callable[[PuzzleModel], WarmStart] | None = None, stage: str = "library") -> Path:
    """BLD of every item of the search space; `inputs_hash` identifies the parent and data.

    `parent` is a model, or a function (device, dtype) -> model so each rank loads straight onto its GPU.
    `items` replaces the search space's items (the refine stage's chosen pairs); `warm_start(parent)` gives
    each item's starting sub-blocks instead of the parent-derived init.
    """
    library_dir = Path(library_dir)
    if train.ndim != 2 or valid.ndim != 2 or train.shape[0] == 0 or valid.shape[0] == 0:
        raise PuzzleError("BLD needs non-empty train and valid token arrays [N, seq_len]; rerun `puzzle data`")
    with distributed(_device(cfg)) as info:
        device = info.device
        started = time.perf_counter()
        reset_peak_memory(device)
        dtype = torch_dtype(cfg.dtype) if cfg.dtype != "auto" else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        settings = {k: v for k, v in to_dict(cfg).items()
                    if k not in ("progress", "device", "max_params_per_wave", "max_items_per_wave", "log_every")}
        fixed = {"items": sorted(it.name for it in items)} if items is not None else {}
        stage_hash = hash_json({"cfg": settings, "inputs": inputs_hash, "dtype": str(dtype), **fixed})
        if stage_is_current(library_dir, stage_hash):
            if info.is_main:
                print(f"library: {library_dir} is current, nothing to do")
            return library_dir
        settings.pop("search_space")
        train_hash = hash_json({"cfg": settings, "inputs": inputs_hash, "dtype": str(dtype)})

        parent = parent(device, dtype) if not isinstance(parent, torch.nn.Module) else parent
        parent = parent.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if int(max(train.max(), valid.max())) >= parent.config.vocab_size:
            raise PuzzleError(f"the data holds token ids >= the parent's vocabulary size "
                              f"{parent.config.vocab_size}; rerun `puzzle data` with the parent's tokenizer")
        if items is None:
            items = all_items(layer_spaces(cfg.search_space, parent.config))
        warm = warm_start(parent) if warm_start is not None else None
        # Rank 0 decides what is finished, so every rank splits the same pending list.
        if info.is_main:  # temporaries of a killed run (no rank writes yet): never entries, so drop them
            for tmp in library_dir.glob("layer*/.*.tmp"):
                tmp.unlink(missing_ok=True)
        pending = [it for it in items if not _finished(library_dir, it, train_hash)] if info.is_main else None
        pending = all_gather_objects(pending)[0]
        barrier()

        blocks = parent.config.blocks
        costs = [item_cost(it, parent.config, is_trained(it, blocks[it.layer])) for it in pending]
        mine = split_items(pending, costs, info.world_size)[info.rank]
        my_costs = [item_cost(it, parent.config, is_trained(it, blocks[it.layer])) for it in mine]
        groups = waves(mine, my_costs, cfg.max_params_per_wave, cfg.max_items_per_wave)
        failed: list[str] = []
        trained_tokens = 0
        for w, group in enumerate(groups):
            desc = f"rank {info.rank} wave {w + 1}/{len(groups)}"
            result = train_wave(parent, group, train, valid, cfg, device, dtype, train_hash, desc, info.rank, warm)
            for entry, tensors in result.done:
                write_entry(library_dir, entry, tensors)
                trained_tokens += int(entry.metrics.get("tokens") or 0)
            failed += result.failed
        # What each GPU did and held (rank 0 records it in library.json), and what failed there: one collective.
        ranks = rank_resources(info, time.perf_counter() - started, items=len(mine), waves=len(groups),
                               trained_tokens=trained_tokens, failed=failed)
        failed = sorted(f for r in ranks for f in r.pop("failed"))  # type: ignore[attr-defined]
        barrier()
        if failed:
            raise PuzzleError(
                f"BLD diverged for {len(failed)} item(s): {'; '.join(failed)}; the other entries are kept: "
                f"lower {stage}.lr or raise library.grad_clip and rerun `puzzle {stage}` to train only the missing ones"
            )
        if info.is_main:
            done = [_finished(library_dir, it, train_hash) for it in items]
            missing = [it.name for it, d in zip(items, done, strict=True) if d is None]
            if missing:
                raise PuzzleError(f"{stage} entries missing after training: {missing}; rerun `puzzle {stage}`")
            info_dict = {"mode": cfg.search_space.mode, "parent": parent.config.to_dict(),
                         "train_hash": train_hash, "config": to_dict(cfg), "ranks": ranks}
            write_index(library_dir, done, info_dict)
            summary = write_summary(library_dir, done)
            mark_stage_done(library_dir, "library", stage_hash, entries=len(done))
            print(summary)
            for r in ranks if info.world_size > 1 else []:
                print(f"library rank {r['rank']}: {r['items']} items in {r['waves']} waves, {r['wall_s']:.1f} s, "
                      f"peak {r['peak_memory_gib']} GiB")
        barrier()
    return library_dir


def _finished(library_dir: Path, item: LibraryEntry, train_hash: str) -> LibraryEntry | None:
    done = read_sidecar(library_dir, item)
    return done if done is not None and done.metrics.get("train_hash") == train_hash else None


def _parent_hash(parent_dir: Path) -> str:
    stamp = parent_dir / STAMP
    if stamp.exists():  # the import stage's own record of what it read: no need to re-hash gigabytes
        return str(read_json(stamp).get("inputs_hash"))
    return hash_paths([parent_dir])


def run_library(run_dir: str | Path | RunDir, cfg: LibraryConfig, parent: PuzzleModel | None = None) -> Path:
    """The pipeline entry point: parent from `run_dir/parent`, tokens from `run_dir/data`, writes `run_dir/library`."""
    run = RunDir(run_dir)
    train, valid = load_tokens(run.data, "train"), load_tokens(run.data, "valid")
    if parent is None:
        parent_dir = run.parent
        if not parent_dir.exists():
            raise PuzzleError(f"{parent_dir} does not exist; run `puzzle import` first")

        def parent_loader(device: torch.device, dtype: torch.dtype) -> PuzzleModel:
            return load_model(parent_dir, device=str(device), dtype=dtype)

        parent_hash = _parent_hash(parent_dir)
        return build_library(run.library, parent_loader, train, valid, cfg,
                             hash_json({"parent": parent_hash, "data": hash_file(run.data_manifest)}))
    # An in-memory parent: identify it by its config and a cheap fingerprint of its weights.
    parent_hash = hash_json(parent.config.to_dict()) + hash_json(
        {k: float(v.float().sum()) for k, v in parent.state_dict().items()})
    inputs_hash = hash_json({"parent": parent_hash, "data": hash_file(run.data_manifest)})
    return build_library(run.library, parent, train, valid, cfg, inputs_hash)
