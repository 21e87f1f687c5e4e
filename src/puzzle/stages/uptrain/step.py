"""One GKD optimizer step, written once for the eager loop and for CUDA-graph capture (`graphed`).

Nothing here reads a device value on the host: the step's metrics come back as one device vector
[cosine, kl, lm, agree, tokens, lm_tokens, grad_norm] (sums over tokens and ranks, see `metrics`), so that a
step costs no host sync and the same code can be captured into a `torch.cuda.CUDAGraph`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from puzzle.stages.uptrain import parallel
from puzzle.stages.uptrain.gkd import LossTerms, loss_terms

if TYPE_CHECKING:
    from puzzle.stages.uptrain.stage import UptrainConfig

NORM = 6  # index of the gradient norm in a step's metric vector
WIDTH = 7  # length of a step's metric vector


def forward_terms(child: nn.Module, parent: nn.Module, ids: torch.Tensor, autocast: bool, with_hidden: bool,
                  cache: bool = True) -> LossTerms:
    """Teacher (no grad) and student forwards on ids [B, T]. `cache=False` turns off autocast's cache of
    bf16 weight copies, which must not outlive a CUDA-graph capture."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=cache):
        with torch.no_grad():
            p_out = parent(ids, output_hidden_states=with_hidden)
        c_out = child(ids, output_hidden_states=with_hidden)
    return loss_terms(c_out.logits, p_out.logits, c_out.hidden_states, p_out.hidden_states, ids)


def objective(t: LossTerms, cfg: UptrainConfig) -> torch.Tensor:
    return (cfg.cosine_weight * t.cosine / t.tokens + cfg.kl_weight * t.kl / t.tokens
            + cfg.lm_weight * t.lm / max(t.lm_tokens, 1))


def sum_vector(t: LossTerms, device: torch.device) -> torch.Tensor:
    """[cosine, kl, lm, agree, tokens, lm_tokens] fp32 on `device` (new_full, not torch.tensor: no host copy)."""
    vals = [t.cosine.detach().float(), t.kl.detach().float(), t.lm.detach().float(), t.agree.float()]
    vals = [v.to(device) for v in vals]
    return torch.stack(vals + [vals[0].new_full((), float(t.tokens)), vals[0].new_full((), float(t.lm_tokens))])


def reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """Sum a metric vector over ranks (in place; a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums


def train_step(wrapped: nn.Module, child: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Sequence[torch.Tensor], cfg: UptrainConfig, mode: parallel.Mode, autocast: bool,
               graphed: bool = False) -> torch.Tensor:
    """Forward + backward over the micro-batches (each [micro, T]), clip, AdamW step -> metric vector [WIDTH].

    Gradients accumulate into whatever `.grad` holds: the caller zeroes them (eagerly) or leaves them to the
    captured graph, whose first backward writes them afresh on every replay.
    """
    device = batches[0].device
    sums = torch.zeros(6, device=device)
    for micro, ids in enumerate(batches):
        with parallel.grad_sync(wrapped, child, mode, sync=micro == len(batches) - 1):
            terms = forward_terms(wrapped, teacher, ids, autocast, with_hidden=cfg.cosine_weight > 0,
                                  cache=not graphed)
            (objective(terms, cfg) / len(batches)).backward()
        sums += sum_vector(terms, device)
    reduce_sums(sums)
    if cfg.grad_clip > 0:
        # foreach on CUDA tensors by default: one fused norm, no host sync (capturable)
        norm = torch.nn.utils.clip_grad_norm_(child.parameters(), cfg.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
    else:
        norm = sums.new_zeros(())
    optimizer.step()
    return torch.cat([sums, norm.reshape(1).float().to(device)])  # [WIDTH]
