"""The block library on disk: one safetensors file + JSON sidecar per sub-block, and `library.json`.

Layout of `library/`:
    library.json                              index: mode, parent summary, every entry (below)
    layer003/attention-gqa2.safetensors       sub-block-relative keys: `norm.weight`, `op.q_proj.weight`, ...
    layer003/attention-gqa2.json              sidecar: layer, variant, init, tokens, val nMSE init/after, wall time
    layer003/ffn-no_op.json                   no-op sub-blocks own no weights: sidecar only
    layer003/block-gqa2+swiglu256.safetensors coupled mode: keys `attention.norm.weight`, `ffn.op.up_proj.weight`, ...
Every file is written atomically (temporary file, then rename), sidecar after weights, so an entry whose
sidecar exists is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.core.artifacts import load_tensors, read_json, save_tensors, write_json
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.model.decoder import AttentionBlock, FFNBlock, build_attention_block, build_ffn_block

INDEX = RunDir.LIBRARY_INDEX
EntryKind = Literal["attention", "ffn", "block"]


@dataclass(frozen=True)
class LibraryEntry:
    """One library member. `attention` is None for kind 'ffn', `ffn` is None for kind 'attention'."""

    layer: int
    kind: EntryKind
    attention: AttentionConfig | None
    ffn: FFNConfig | None
    file: str | None  # weights, relative to the library dir; None for no-op sub-blocks
    metrics: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def variant(self) -> str:
        """'gqa2', 'swiglu256' or 'gqa2+swiglu256' (coupled)."""
        if self.kind == "attention":
            return self.attention.name
        if self.kind == "ffn":
            return self.ffn.name
        return f"{self.attention.name}+{self.ffn.name}"

    @property
    def name(self) -> str:
        """Unique within a library, e.g. 'layer3/attention-gqa2'."""
        return f"layer{self.layer}/{self.kind}-{self.variant}"

    @property
    def stem(self) -> str:
        """Path of the entry's files without extension, relative to the library dir."""
        return f"layer{self.layer:03d}/{self.kind}-{self.variant}"

    @property
    def has_weights(self) -> bool:
        if self.kind == "attention":
            return self.attention.kind != "no_op"
        if self.kind == "ffn":
            return self.ffn.kind != "no_op"
        return self.attention.kind != "no_op" or self.ffn.kind != "no_op"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "kind": self.kind,
            "attention": self.attention.to_dict() if self.attention is not None else None,
            "ffn": self.ffn.to_dict() if self.ffn is not None else None,
            "file": self.file, "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LibraryEntry:
        return cls(
            layer=int(data["layer"]), kind=data["kind"],
            attention=AttentionConfig.from_dict(data["attention"]) if data.get("attention") else None,
            ffn=FFNConfig.from_dict(data["ffn"]) if data.get("ffn") else None,
            file=data.get("file"), metrics=dict(data.get("metrics") or {}),
        )


def write_entry(library_dir: Path, entry: LibraryEntry, tensors: dict[str, torch.Tensor]) -> LibraryEntry:
    """Weights first, then the sidecar (its presence marks the entry complete). Returns the entry with `file` set."""
    file = f"{entry.stem}.safetensors" if entry.has_weights else None
    if file is not None:
        save_tensors(library_dir / file, tensors, metadata={"entry": entry.name})
    done = LibraryEntry(entry.layer, entry.kind, entry.attention, entry.ffn, file, entry.metrics)
    write_json(library_dir / f"{entry.stem}.json", done.to_dict())
    return done


def read_sidecar(library_dir: Path, entry: LibraryEntry) -> LibraryEntry | None:
    """The finished entry on disk with the same identity, or None."""
    path = library_dir / f"{entry.stem}.json"
    if not path.exists():
        return None
    try:
        done = LibraryEntry.from_dict(read_json(path))
    except (PuzzleError, KeyError, TypeError):
        return None  # damaged sidecar: treat as unfinished and retrain
    if done.file is not None and not (library_dir / done.file).exists():
        return None
    return done


def write_index(library_dir: Path, entries: list[LibraryEntry], info: dict[str, Any]) -> None:
    entries = sorted(entries, key=lambda e: (e.layer, e.kind, e.variant))
    write_json(library_dir / INDEX, {**info, "entries": [e.to_dict() for e in entries]})


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class Library:
    """Read access to a finished library (what scoring, realize and search use)."""

    def __init__(self, library_dir: Path, info: dict[str, Any], entries: list[LibraryEntry]) -> None:
        self.dir = library_dir
        self.info = info
        self.entries = entries
        self._by_key = {(e.layer, e.kind, e.variant): e for e in entries}

    @classmethod
    def open(cls, library_dir: str | Path) -> Library:
        library_dir = Path(library_dir)
        index = library_dir / INDEX
        if not index.exists():
            raise PuzzleError(f"{index} does not exist; run `puzzle library RUN_DIR` first")
        data = read_json(index)
        entries = [LibraryEntry.from_dict(e) for e in data.get("entries", [])]
        info = {k: v for k, v in data.items() if k != "entries"}
        return cls(library_dir, info, entries)

    @property
    def mode(self) -> str:
        return str(self.info.get("mode", "decoupled"))

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.entries})

    def has(self, layer: int, kind: EntryKind, variant: str) -> bool:
        """Whether the library holds this (layer, kind, variant) entry (`variant`: a sub-block's or pair's name)."""
        return (layer, kind, variant) in self._by_key

    def entries_for(self, layer: int, kind: EntryKind | None = None) -> list[LibraryEntry]:
        return [e for e in self.entries if e.layer == layer and (kind is None or e.kind == kind)]

    def entry(self, layer: int, kind: EntryKind, variant: str) -> LibraryEntry:
        try:
            return self._by_key[(layer, kind, variant)]
        except KeyError:
            have = sorted(e.variant for e in self.entries_for(layer, kind))
            raise PuzzleError(
                f"the library has no {kind} '{variant}' for layer {layer} (it has {have}); "
                "add it to library.search_space and rerun `puzzle library`"
            ) from None

    def candidates(self, layer: int) -> list[BlockConfig]:
        """Decoupled: every attention x FFN pair; coupled: the trained pairs."""
        blocks = [BlockConfig(e.attention, e.ffn) for e in self.entries_for(layer, "block")]
        atts = [e.attention for e in self.entries_for(layer, "attention")]
        ffns = [e.ffn for e in self.entries_for(layer, "ffn")]
        blocks += [BlockConfig(a, f) for a in atts for f in ffns]
        return list(dict.fromkeys(blocks))  # de-duplicate, keep order

    def _tensors(self, entry: LibraryEntry) -> dict[str, torch.Tensor]:
        return load_tensors(self.dir / entry.file) if entry.file is not None else {}

    def _block_entry(self, layer: int, attention: AttentionConfig | None, ffn: FFNConfig | None) -> LibraryEntry:
        """A coupled entry matching the given half (and the other half when given)."""
        if not self.entries_for(layer, "block"):
            kind, cfg = ("attention", attention) if attention is not None else ("ffn", ffn)
            self.entry(layer, kind, cfg.name)  # raises: names what the layer does have
        found = [e for e in self.entries_for(layer, "block")
                 if (attention is None or e.attention == attention) and (ffn is None or e.ffn == ffn)]
        if len(found) != 1:
            what = f"{attention.name if attention else '*'}+{ffn.name if ffn else '*'}"
            raise PuzzleError(
                f"layer {layer}: {len(found)} coupled library entries match {what}; "
                "ask for the whole pair with Library.block(layer, BlockConfig, model_config)"
            )
        return found[0]

    def attention_block(self, layer: int, attention: AttentionConfig, model_config: ModelConfig,
                        pair_ffn: FFNConfig | None = None) -> AttentionBlock | None:
        """The trained attention sub-block (None for no_op). In coupled mode, `pair_ffn` picks the pair."""
        if attention.kind == "no_op":
            return None
        if (layer, "attention", attention.name) in self._by_key and pair_ffn is None:
            tensors = self._tensors(self._by_key[(layer, "attention", attention.name)])
        else:
            tensors = _strip(self._tensors(self._block_entry(layer, attention, pair_ffn)), "attention.")
        if not tensors:
            self.entry(layer, "attention", attention.name)  # raises the helpful error
        return _load(lambda: build_attention_block(model_config, attention), tensors,
                     f"layer {layer} attention {attention.name}")

    def ffn_block(self, layer: int, ffn: FFNConfig, model_config: ModelConfig,
                  pair_attention: AttentionConfig | None = None) -> FFNBlock | None:
        """The trained FFN sub-block (None for no_op). In coupled mode, `pair_attention` picks the pair."""
        if ffn.kind == "no_op":
            return None
        if (layer, "ffn", ffn.name) in self._by_key and pair_attention is None:
            tensors = self._tensors(self._by_key[(layer, "ffn", ffn.name)])
        else:
            tensors = _strip(self._tensors(self._block_entry(layer, pair_attention, ffn)), "ffn.")
        if not tensors:
            self.entry(layer, "ffn", ffn.name)
        return _load(lambda: build_ffn_block(model_config, ffn), tensors, f"layer {layer} ffn {ffn.name}")

    def block(self, layer: int, block: BlockConfig, model_config: ModelConfig
              ) -> tuple[AttentionBlock | None, FFNBlock | None]:
        """Both sub-blocks of one layer of a child (works in either mode)."""
        if self.entries_for(layer, "block") and (layer, "block", block.name) in self._by_key:
            return (self.attention_block(layer, block.attention, model_config, pair_ffn=block.ffn),
                    self.ffn_block(layer, block.ffn, model_config, pair_attention=block.attention))
        return (self.attention_block(layer, block.attention, model_config),
                self.ffn_block(layer, block.ffn, model_config))


def _load(build: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """The module built on the meta device and given the stored tensors as its parameters: no random init and
    no second copy (initialising an 8B-shape FFN on the CPU takes seconds, and scoring loads hundreds)."""
    with torch.device("meta"):
        module = build()
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise PuzzleError(
            f"library weights for {what} do not fit the model (missing {missing}, unexpected {unexpected}); "
            "the library was built for another parent: rerun `puzzle library`"
        )
    return module
