"""Distillation losses and teacher/student metrics shared by GKD (uptrain) and evaluation.

All reductions are sums over tokens, returned with the token count, so that callers can add them up across
micro-batches and ranks and divide once (an exact global mean regardless of how the batch was split).
Shapes: B batch, T tokens, H hidden, V vocabulary, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    """Per-token sums (differentiable where they come from the student) and the number of tokens."""

    cosine: torch.Tensor  # sum over tokens of the mean over layers of (1 - cos)
    kl: torch.Tensor  # sum over tokens of KL(parent || child)
    lm: torch.Tensor  # sum over predicted tokens of next-token cross-entropy
    agree: torch.Tensor  # number of tokens where argmax(child) == argmax(parent)
    tokens: int  # tokens behind cosine / kl / agree
    lm_tokens: int  # tokens behind lm (T - 1 per sequence)


def cosine_distance_sum(child_hidden: list[torch.Tensor], parent_hidden: list[torch.Tensor]) -> torch.Tensor:
    """Sum over tokens of the mean over layers of 1 - cos(child, parent); hidden states [B, T, H] each."""
    per_layer = [
        1.0 - F.cosine_similarity(c.float(), p.float(), dim=-1, eps=1e-6)  # [B, T]
        for c, p in zip(child_hidden, parent_hidden, strict=True)
    ]
    return torch.stack(per_layer).mean(0).sum()


def kl_sum(parent_logits: torch.Tensor, child_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(parent || child); logits [B, T, V], computed in fp32."""
    p_log = F.log_softmax(parent_logits.float(), dim=-1)
    q_log = F.log_softmax(child_logits.float(), dim=-1)
    return F.kl_div(q_log, p_log, log_target=True, reduction="sum")


def lm_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy; logits [B, T, V], input_ids [B, T] -> scalar over B*(T-1) tokens."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


def loss_terms(child_logits: torch.Tensor, parent_logits: torch.Tensor, child_hidden: list[torch.Tensor] | None,
               parent_hidden: list[torch.Tensor] | None, input_ids: torch.Tensor) -> LossTerms:
    b, t = input_ids.shape
    if child_hidden is not None and parent_hidden is not None:
        cos = cosine_distance_sum(child_hidden, parent_hidden)
    else:
        cos = child_logits.new_zeros((), dtype=torch.float32)
    agree = (child_logits.argmax(-1) == parent_logits.argmax(-1)).sum().float()
    return LossTerms(
        cosine=cos, kl=kl_sum(parent_logits, child_logits), lm=lm_sum(child_logits, input_ids), agree=agree,
        tokens=b * t, lm_tokens=b * (t - 1),
    )
