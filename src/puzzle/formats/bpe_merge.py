"""llama2.c's greedy BPE merge in O(n log n): a heap of candidate pairs over a linked list of tokens.

The reference loop rescans every adjacent pair after each merge (O(n^2)) and merges the pair whose
concatenation scores best, the leftmost on ties. The heap orders candidates by (-score, position of the
left token); positions keep their order under merges, so the leftmost-on-ties rule is the same. A popped
candidate is used only when both of its tokens are still the ones it was built from (per-node versions).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

# The reference starts from best = -1e10 and needs a strictly better score: lower (and NaN) never merge.
_FLOOR = -1e10


def bpe_merge(ids: list[int], pair_merge: Callable[[int, int], tuple[int, float] | None]) -> list[int]:
    """Merge `ids` greedily; `pair_merge(a, b)` gives (merged id, its score) or None when a+b is no piece."""
    n = len(ids)
    if n < 2:
        return list(ids)
    tok = list(ids)
    nxt = list(range(1, n + 1))  # n = end of list
    prv = list(range(-1, n - 1))
    version = [0] * n
    alive = [True] * n
    cache: dict[tuple[int, int], tuple[int, float] | None] = {}

    def lookup(a: int, b: int) -> tuple[int, float] | None:
        key = (a, b)
        if key not in cache:
            hit = pair_merge(a, b)
            cache[key] = hit if hit is not None and hit[1] > _FLOOR else None
        return cache[key]

    # entry: (-score, left position, left version, right position, right version, merged id)
    heap: list[tuple[float, int, int, int, int, int]] = []
    for i in range(n - 1):
        hit = lookup(tok[i], tok[i + 1])
        if hit is not None:
            heap.append((-hit[1], i, 0, i + 1, 0, hit[0]))
    heapq.heapify(heap)

    def push(left: int, right: int) -> None:
        hit = lookup(tok[left], tok[right])
        if hit is not None:
            heapq.heappush(heap, (-hit[1], left, version[left], right, version[right], hit[0]))

    while heap:
        _, left, lv, right, rv, merged = heapq.heappop(heap)
        if not (alive[left] and alive[right] and version[left] == lv and version[right] == rv
                and nxt[left] == right):
            continue  # stale: one side was merged away or changed since this candidate was built
        tok[left] = merged
        version[left] += 1
        alive[right] = False
        after = nxt[right]
        nxt[left] = after
        if after < n:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            push(before, left)
        if after < n:
            push(left, after)

    out, i = [], 0
    while i < n:
        out.append(tok[i])
        i = nxt[i]
    return out
