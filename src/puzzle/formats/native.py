"""The native format: config.json (ModelConfig.to_dict() + a format marker), model.safetensors with our
keys, and the tokenizer files copied beside them. Written atomically (a killed save leaves nothing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from puzzle.core.artifacts import atomic_dir, load_tensors, save_tensors
from puzzle.core.errors import PuzzleError
from puzzle.core.tmpfiles import match_umask
from puzzle.formats.hf import read_json_file
from puzzle.formats.tokenizers import has_tokenizer, load_tokenizer
from puzzle.formats.weights import model_from_state_dict
from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import PuzzleModel

FORMAT_KEY = "puzzle_format"
FORMAT_VALUE = "native-v1"
WEIGHTS = "model.safetensors"


def is_native_config(data: dict[str, Any]) -> bool:
    return data.get(FORMAT_KEY) == FORMAT_VALUE


def native_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    data = {k: v for k, v in data.items() if k != FORMAT_KEY}
    return ModelConfig.from_dict(data)


def config_to_native_dict(config: ModelConfig) -> dict[str, Any]:
    return {FORMAT_KEY: FORMAT_VALUE, **config.to_dict()}


def copy_tokenizer_files(tokenizer_source: Any, out_dir: Path) -> list[str]:
    """Copy the tokenizer of `tokenizer_source` (a path or a loaded Tokenizer) into out_dir; return names."""
    if tokenizer_source is None:
        return []
    if isinstance(tokenizer_source, (str, Path)):
        source = Path(tokenizer_source)
        if source.is_dir() and not has_tokenizer(source):
            return []  # a model directory without a tokenizer: nothing to carry over
        tok = load_tokenizer(source)
    else:
        tok = tokenizer_source
    names = []
    for f in tok.files:
        shutil.copyfile(f, out_dir / Path(f).name)  # contents only: a read-only source must not stay read-only
        names.append(Path(f).name)
    return names


def make_readable(directory: Path) -> None:
    """The directory and its files get the modes the umask gives new files (copies may carry a source's mode)."""
    match_umask(directory)
    for f in directory.iterdir():
        if f.is_file():
            match_umask(f)


def save_model(model: PuzzleModel, out_dir: str | Path, tokenizer_source: Any = None) -> Path:
    """Write `model` natively into out_dir (replacing it atomically)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_native_dict(model.config), indent=2) + "\n")
        save_tensors(tmp / WEIGHTS, model.state_dict(), metadata={"format": "pt"})
        copy_tokenizer_files(tokenizer_source, tmp)
        make_readable(tmp)
    return out_dir


def load_native(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PuzzleModel:
    config = native_config_from_dict(read_json_file(model_dir / "config.json"))
    weights = model_dir / WEIGHTS
    if not weights.exists():
        raise PuzzleError(f"{model_dir} has a native config.json but no {WEIGHTS}; re-create it")
    return model_from_state_dict(config, load_tensors(weights), str(model_dir), device, dtype)
