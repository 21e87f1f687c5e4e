"""Cost-balanced split of BLD work items across ranks (longest-processing-time-first greedy)."""

from __future__ import annotations

from puzzle.model.blocks import ModelConfig, attention_param_count, ffn_param_count
from puzzle.stages.library.store import LibraryEntry

# Items with nothing to train (no-op, the parent's own) still cost a validation pass.
_MIN_COST = 1.0


def item_cost(item: LibraryEntry, model: ModelConfig, trained: bool) -> float:
    """Proportional to the FLOPs of training the item: its parameter count (compute ~ 6 x params x tokens)."""
    if not trained:
        return _MIN_COST
    h, d, nq = model.hidden_size, model.head_dim, model.num_attention_heads
    params = 0
    if item.attention is not None:
        params += attention_param_count(item.attention, h, d, nq, model.attention_bias)
    if item.ffn is not None:
        params += ffn_param_count(item.ffn, h)
    return float(max(params, 1))


def split_items(items: list[LibraryEntry], costs: list[float], world_size: int) -> list[list[LibraryEntry]]:
    """Assign every item to one rank so the ranks' total costs are as even as the greedy gets.

    Deterministic (ties broken by layer and name), so every rank computes the same split.
    Each rank's list comes back sorted by (layer, kind, variant).
    """
    order = sorted(range(len(items)), key=lambda i: (-costs[i], items[i].layer, items[i].name))
    loads = [0.0] * world_size
    out: list[list[LibraryEntry]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        loads[r] += costs[i]
        out[r].append(items[i])
    return [sorted(rank, key=lambda e: (e.layer, e.kind, e.variant)) for rank in out]


def waves(items: list[LibraryEntry], costs: list[float], max_params: int, max_items: int) -> list[list[LibraryEntry]]:
    """Cut one rank's items into groups trained together (one parent forward per batch feeds a whole group).

    0 = no limit. Limits bound memory (trainable weights + optimiser state); the one-at-a-time baseline
    of the benchmark is max_items=1.
    """
    cost_of = {it.name: c for it, c in zip(items, costs, strict=True)}
    groups: list[list[LibraryEntry]] = []
    current: list[LibraryEntry] = []
    load = 0.0
    for it in items:
        c = cost_of[it.name]
        full = (max_items and len(current) >= max_items) or (max_params and current and load + c > max_params)
        if full:
            groups.append(current)
            current, load = [], 0.0
        current.append(it)
        load += c
    if current:
        groups.append(current)
    return groups
