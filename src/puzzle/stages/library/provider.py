"""Candidate sub-blocks for a layer, from the library or the parent itself: what scoring and realize assemble."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import AttentionBlock, FFNBlock, PuzzleModel

# (layer, block) -> the block's attention and FFN sub-blocks (None: a no-op sub-block)
BlockProvider = Callable[[int, BlockConfig], tuple[AttentionBlock | None, FFNBlock | None]]


def library_provider(library: Any, parent: PuzzleModel) -> BlockProvider:
    """Candidate sub-blocks from the library (`Library.block`, either mode). Where the library holds no entry
    for a sub-block that equals the parent's own variant, the parent's sub-block is used: it *is* that block.

    Within one layer each sub-block is read once and the same module is given to every candidate that holds
    it (scoring asks for every attention x FFN pair of a layer: reading each FFN once per attention variant
    made an 8B-shape layer take 16 s). Moving one of them to a device moves it for all of them."""
    config = parent.config
    memo: dict[tuple[int, str, str], Any] = {}  # (layer, kind, variant) -> sub-block, for the current layer only

    def sub(layer: int, kind: str, name: str, read: Callable[[], Any]) -> Any:
        if any(key[0] != layer for key in memo):
            memo.clear()
        if (layer, kind, name) not in memo:
            memo[(layer, kind, name)] = read()
        return memo[(layer, kind, name)]

    def provide(layer: int, block: BlockConfig) -> tuple[AttentionBlock | None, FFNBlock | None]:
        own = config.blocks[layer]
        if library.has(layer, "block", block.name):  # a coupled pair
            return library.block(layer, block, config)
        att = parent.layers[layer].attention if block.attention == own.attention and \
            not library.has(layer, "attention", block.attention.name) else \
            sub(layer, "attention", block.attention.name,
                lambda: library.attention_block(layer, block.attention, config))
        ffn = parent.layers[layer].ffn if block.ffn == own.ffn and not library.has(layer, "ffn", block.ffn.name) \
            else sub(layer, "ffn", block.ffn.name, lambda: library.ffn_block(layer, block.ffn, config))
        return att, ffn

    return provide


def refined_provider(refined: Any, library: Any, parent: PuzzleModel) -> BlockProvider:
    """The refine stage's coupled entries (`refined`, a `Library`) where one exists for (layer, block), else what
    `library_provider(library, parent)` gives: the decoupled halves or the parent's own sub-blocks."""
    base = library_provider(library, parent)

    def provide(layer: int, block: BlockConfig) -> tuple[AttentionBlock | None, FFNBlock | None]:
        if refined.has(layer, "block", block.name):
            return refined.block(layer, block, parent.config)
        return base(layer, block)

    return provide
