"""Teacher-forced blockwise local distillation of one group ("wave") of library items.

One parent forward per batch produces, for every layer the wave touches, the parent's input and output of
each sub-block; every variant in the wave trains on those tensors (the parent is never re-run per variant).
Loss = normalised MSE ||y_child - y_parent||^2 / ||y_parent||^2 on the sub-block's residual update.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import PuzzleModel
from puzzle.model.kinds import ffn_kind
from puzzle.stages.library.init import (
    STATS_FFN_KINDS,
    CalibrationStats,
    init_attention,
    init_ffn,
    swiglu_activations,
)
from puzzle.stages.library.store import LibraryEntry
from puzzle.stages.library.wave_optimizer import WaveOptimizer
from puzzle.stages.uptrain.lr_schedule import warmup_cosine

if TYPE_CHECKING:
    from puzzle.stages.library import LibraryConfig


@dataclass
class LayerActs:
    """The parent's tensors around one layer, each [B, T, H]."""

    h_in: torch.Tensor  # layer input = attention input
    att_out: torch.Tensor  # attention residual update
    h_mid: torch.Tensor  # h_in + att_out = FFN input
    ffn_out: torch.Tensor  # FFN residual update


@torch.no_grad()
def parent_activations(parent: PuzzleModel, ids: torch.Tensor, layers: set[int]
                       ) -> tuple[dict[int, LayerActs], torch.Tensor, torch.Tensor]:
    """Run the parent once up to the last needed layer; ids [B, T] -> per-layer acts, cos, sin [B, T, D]."""
    h = parent.embed(ids)
    cos, sin = parent.rope(parent.default_positions(ids), h.dtype)
    acts: dict[int, LayerActs] = {}
    for i in range(max(layers) + 1):
        layer = parent.layers[i]
        a = layer.attention(h, cos, sin) if layer.attention is not None else torch.zeros_like(h)
        mid = h + a
        f = layer.ffn(mid) if layer.ffn is not None else torch.zeros_like(h)
        if i in layers:
            acts[i] = LayerActs(h, a, mid, f)
        h = mid + f
    return acts, cos, sin


class Candidate(nn.Module):
    """One library item as a trainable module: attention, FFN, or a coupled (attention, FFN) pair."""

    def __init__(self, item: LibraryEntry, attention: nn.Module | None, ffn: nn.Module | None) -> None:
        super().__init__()
        self.item = item
        self.attention = attention
        self.ffn = ffn

    def forward(self, acts: LayerActs, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(child output, parent target), both [B, T, H]."""
        kind = self.item.kind
        if kind == "attention":
            y = self.attention(acts.h_in, cos, sin) if self.attention is not None else torch.zeros_like(acts.h_in)
            return y, acts.att_out
        if kind == "ffn":
            y = self.ffn(acts.h_mid) if self.ffn is not None else torch.zeros_like(acts.h_mid)
            return y, acts.ffn_out
        a = self.attention(acts.h_in, cos, sin) if self.attention is not None else torch.zeros_like(acts.h_in)
        f = self.ffn(acts.h_in + a) if self.ffn is not None else torch.zeros_like(acts.h_in)
        return a + f, acts.att_out + acts.ffn_out

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """State dict with sub-block-relative keys ('norm.weight', or 'attention.norm.weight' for pairs)."""
        sd = {k: v.detach().to(dtype) for k, v in self.state_dict().items()}
        if self.item.kind == "block":
            return sd
        prefix = f"{self.item.kind}."
        return {k[len(prefix):]: v for k, v in sd.items()}


def is_parent_item(item: LibraryEntry, parent: BlockConfig) -> bool:
    """The parent's own sub-block (or pair): loss 0, nothing to train."""
    if item.kind == "attention":
        return item.attention == parent.attention
    if item.kind == "ffn":
        return item.ffn == parent.ffn
    return BlockConfig(item.attention, item.ffn) == parent


def is_trained(item: LibraryEntry, parent: BlockConfig) -> bool:
    return item.has_weights and not is_parent_item(item, parent)


def nmse_parts(y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared error, sum of squared target) in fp32."""
    t = target.float()
    return (y.float() - t).pow(2).sum(), t.pow(2).sum()


class Batches:
    """Deterministic batches of token rows, the same for every item whatever wave or rank trains it."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seed: int, shuffle: bool) -> None:
        self.tokens, self.batch_size = tokens, batch_size
        n = tokens.shape[0]
        self.order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)

    def __call__(self, step: int, device: torch.device) -> torch.Tensor:
        n = len(self.order)
        idx = np.sort(self.order[(np.arange(self.batch_size) + step * self.batch_size) % n])
        return torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64)).to(device)  # [B, T]


def _init_names(item: LibraryEntry, parent: BlockConfig, kv_init: str) -> str:
    def att(a):
        if a == parent.attention:
            return "parent"
        return {"gqa": "kv_pca" if kv_init == "pca" else "kv_mean_pool", "linear": "ridge_lstsq", "no_op": "none"}[a.kind]

    def ffn(f):
        if f == parent.ffn:
            return "parent"
        return ffn_kind(f.kind).init_name

    if item.kind == "attention":
        return att(item.attention)
    if item.kind == "ffn":
        return ffn(item.ffn)
    return f"{att(item.attention)}+{ffn(item.ffn)}"


@torch.no_grad()
def calibrate(parent: PuzzleModel, items: list[LibraryEntry], batches: Batches, n_batches: int,
              device: torch.device, kv_init: str) -> dict[tuple[int, str], CalibrationStats]:
    """Streaming statistics for the inits that need data: keys (layer, 'attention'|'ffn')."""
    need: dict[tuple[int, str], CalibrationStats] = {}
    for it in items:
        parent_block = parent.config.blocks[it.layer]
        if it.attention is not None and (it.attention.kind == "linear" or (
                kv_init == "pca" and it.attention.kind == "gqa" and it.attention != parent_block.attention)):
            need[(it.layer, "attention")] = CalibrationStats()
        if it.ffn is not None and it.ffn != parent_block.ffn and it.ffn.kind in STATS_FFN_KINDS:
            need[(it.layer, "ffn")] = CalibrationStats()
    if not need:
        return need
    linear_ffn = {it.layer for it in items if it.ffn is not None and it.ffn.kind == "linear"}
    # x^T y only for the ridge fits of linear attention; fewer KV heads (kv_init=pca) read x^T x alone
    linear_attention = {it.layer for it in items if it.attention is not None and it.attention.kind == "linear"}
    for b in range(n_batches):
        ids = batches(b, device)
        acts, _, _ = parent_activations(parent, ids, {layer for layer, _ in need})
        for (layer, kind), stats in need.items():
            a, block = acts[layer], parent.layers[layer]
            stats.tokens += ids.numel()
            if kind == "attention":
                x = block.attention.norm(a.h_in)
                if layer in linear_attention:
                    stats.add_linear(x, a.att_out)
                else:
                    stats.add_covariance(x)
                continue
            if block.ffn.config.kind == "swiglu":
                stats.add_activations(swiglu_activations(block.ffn, a.h_mid))
            if layer in linear_ffn:
                stats.add_linear(block.ffn.norm(a.h_mid), a.ffn_out)
    return need


def build_candidate(parent: PuzzleModel, item: LibraryEntry, stats: dict[tuple[int, str], CalibrationStats],
                    ridge: float, kv_init: str) -> Candidate:
    layer, model = parent.layers[item.layer], parent.config
    if is_parent_item(item, model.blocks[item.layer]):
        # Nothing to train: the parent's own modules, not an fp32 copy (0.9 GB per Llama-8B layer in a wave).
        keep_att, keep_ffn = item.kind in ("attention", "block"), item.kind in ("ffn", "block")
        return Candidate(item, layer.attention if keep_att else None, layer.ffn if keep_ffn else None)
    att = ffn = None
    if item.attention is not None:
        att = init_attention(layer.attention, item.attention, model, stats.get((item.layer, "attention")), ridge,
                             kv_init) \
            if item.attention.kind != "no_op" else None
    if item.ffn is not None:
        ffn = init_ffn(layer.ffn, item.ffn, model, stats.get((item.layer, "ffn")), ridge) \
            if item.ffn.kind != "no_op" else None
    return Candidate(item, att, ffn)


@torch.no_grad()
def validate(parent: PuzzleModel, cands: list[Candidate], batches: Batches, n_batches: int,
             device: torch.device, autocast: Any) -> dict[str, float]:
    """Normalised MSE of every candidate over the validation batches (sums over all tokens, then ratio)."""
    if not cands:
        return {}
    sums = torch.zeros(len(cands), 2, dtype=torch.float64, device=device)  # [candidate, (error, reference)]
    layers = {c.item.layer for c in cands}
    for b in range(n_batches):
        acts, cos, sin = parent_activations(parent, batches(b, device), layers)
        for i, c in enumerate(cands):
            with autocast():
                e, r = nmse_parts(*c(acts[c.item.layer], cos, sin))
            sums[i] += torch.stack([e, r]).double()  # stays on the device: one copy to the host at the end
    values = sums.cpu().tolist()
    out = {}
    for c, (err, ref) in zip(cands, values, strict=True):
        out[c.item.name] = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    return out


def _schedule(steps: int, warmup_fraction: float, min_lr_fraction: float):
    warmup = max(1, math.ceil(warmup_fraction * steps)) if warmup_fraction > 0 else 0

    return lambda step: warmup_cosine(step, steps, warmup, min_lr_fraction)


@dataclass
class WaveResult:
    done: list[tuple[LibraryEntry, dict[str, torch.Tensor]]]  # entries with metrics, and their weights
    failed: list[str]  # "layer3/ffn-linear: loss nan at step 12"


# item -> its (attention, FFN) sub-blocks to start from instead of the parent-derived init (None: a no-op half)
WarmStart = Callable[[LibraryEntry], tuple[nn.Module | None, nn.Module | None]]


def warm_candidate(item: LibraryEntry, warm_start: WarmStart, device: torch.device) -> Candidate:
    """A trainable fp32 copy of the warm-start modules (copied: a provider may share one module between items)."""
    att, ffn = warm_start(item)
    own = [copy.deepcopy(m).to(device=device, dtype=torch.float32).requires_grad_(True) if m is not None else None
           for m in (att, ffn)]
    return Candidate(item, *own)


def train_wave(parent: PuzzleModel, items: list[LibraryEntry], train: np.ndarray, valid: np.ndarray,
               cfg: LibraryConfig, device: torch.device, save_dtype: torch.dtype, train_hash: str,
               desc: str, rank: int, warm_start: WarmStart | None = None) -> WaveResult:
    """Initialise (from the parent, or `warm_start`), validate, train and re-validate every item of one wave;
    NaN stops only that item."""
    start = time.perf_counter()
    seq_len = train.shape[1]
    train_batches = Batches(train, cfg.batch_size, cfg.seed, shuffle=True)
    calib_batches = Batches(train, cfg.batch_size, cfg.seed + 1, shuffle=True)
    valid_batches = Batches(valid, cfg.batch_size, cfg.seed, shuffle=False)
    n_valid = max(1, min(cfg.valid_batches, math.ceil(valid.shape[0] / cfg.batch_size)))
    use_amp = device.type == "cuda" and cfg.autocast

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()

    if warm_start is not None:
        cands = [warm_candidate(it, warm_start, device) for it in items]
    else:
        stats = calibrate(parent, items, calib_batches, cfg.init_batches, device, cfg.kv_init)
        cands = [build_candidate(parent, it, stats, cfg.ridge, cfg.kv_init) for it in items]
        del stats
    init_loss = validate(parent, cands, valid_batches, n_valid, device, autocast)

    steps = max(1, math.ceil(cfg.tokens_per_variant / (cfg.batch_size * seq_len)))
    active = [c for c in cands if is_trained(c.item, parent.config.blocks[c.item.layer])]
    optimizer = WaveOptimizer({c.item.name: list(c.parameters()) for c in active}, cfg.lr, cfg.weight_decay,
                              (0.9, 0.95), _schedule(steps, cfg.warmup_fraction, cfg.min_lr_fraction),
                              cfg.grad_clip) if active else None
    failed: dict[str, str] = {}
    last_loss: dict[str, float] = {}
    layers = {c.item.layer for c in active}
    bar = tqdm(total=steps * cfg.batch_size * seq_len if active else 0, desc=desc, unit="tok", unit_scale=True,
               position=rank, leave=True, disable=not cfg.progress, dynamic_ncols=True)
    for step in range(steps if active else 0):
        acts, cos, sin = parent_activations(parent, train_batches(step, device), layers)
        losses: list[tuple[Candidate, torch.Tensor]] = []
        for c in active:
            if c.item.name in failed:
                continue
            with autocast():
                err, ref = nmse_parts(*c(acts[c.item.layer], cos, sin))
                loss = err / ref.clamp_min(1e-30)
            loss.backward()  # per variant: its activations are freed before the next variant's forward
            losses.append((c, loss.detach()))
        if losses:
            optimizer.step()  # type: ignore[union-attr]  # every variant's clip and AdamW step at once
        if losses and (step % cfg.log_every == 0 or step == steps - 1):
            # Checked only on logged steps: a per-step check would sync the GPU once per item per step.
            values = torch.stack([v for _, v in losses]).float().cpu().tolist()
            for (c, _), v in zip(losses, values, strict=True):
                last_loss[c.item.name] = v
                if not math.isfinite(v):
                    failed[c.item.name] = f"{c.item.name}: loss {v} by step {step}"
                    optimizer.drop(c.item.name)  # type: ignore[union-attr]  # the rest keep training
            finite = [v for v in values if math.isfinite(v)]
            bar.set_postfix(loss=f"{sum(finite) / max(1, len(finite)):.4g}", items=len(finite))
        bar.update(cfg.batch_size * seq_len)
    bar.close()

    survivors = [c for c in cands if c.item.name not in failed]
    after = validate(parent, [c for c in survivors if c in active], valid_batches, n_valid, device, autocast)
    wall = time.perf_counter() - start
    done = []
    for c in survivors:
        trained = c in active
        if trained and not math.isfinite(after[c.item.name]):
            failed[c.item.name] = f"{c.item.name}: validation loss {after[c.item.name]} after training"
            continue
        metrics = {
            "init": "warm_start" if warm_start is not None else _init_names(c.item, parent.config.blocks[c.item.layer],
                                                                            cfg.kv_init),
            "val_nmse_init": init_loss[c.item.name],
            "val_nmse_after": after[c.item.name] if trained else init_loss[c.item.name],
            "train_nmse_last": last_loss.get(c.item.name),
            "tokens": steps * cfg.batch_size * seq_len if trained else 0,
            "steps": steps if trained else 0,
            "wall_s": round(wall, 3),  # the whole wave's time: its items train together
            "wave_items": len(items),
            "params": sum(p.numel() for p in c.parameters()),
            "train_hash": train_hash,
        }
        entry = LibraryEntry(c.item.layer, c.item.kind, c.item.attention, c.item.ffn, None, metrics)
        done.append((entry, c.weights(save_dtype)))
    return WaveResult(done, sorted(failed.values()))
